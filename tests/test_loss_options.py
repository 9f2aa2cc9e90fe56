"""The loss options on the command line: declared once for train and eval, refused (exit 2, one
`error:` line) where TRL 1.16 refuses or ignores them, and taken by eval from a run's run_config.json
unless given."""

from __future__ import annotations

import json

import pytest

from conftest import MODEL, invoke

# That train and eval declare the same loss options, with the library's defaults, is
# tests/test_options.py's (LossOpts is one group, taken by both).


# ---------------------------------------------------------------- refusals through the CLI


def _refused(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert all(word in errors[0] for word in words), errors[0]
    return errors[0]


REFUSALS = [
    (["--loss", "sigmoid", "--label-smoothing", "0.1"], ["label_smoothing", "no effect"]),
    (["--loss", "hinge", "--label-smoothing", "0.2"], ["label_smoothing", "no effect"]),
    (["--loss", "exo_pair"], ["label_smoothing", "exo_pair"]),
    (["--loss", "nca_pair", "--f-divergence", "js_divergence"], ["f_divergence", "nca_pair"]),
    (["--loss", "sigmoid,apo_zero", "--f-divergence", "forward_kl"], ["f_divergence", "apo_zero"]),
    (["--loss", "aot", "--f-divergence", "alpha_divergence"], ["f_divergence", "aot"]),
]


@pytest.mark.parametrize("flags,words", REFUSALS)
def test_train_refuses(flags, words, small_cache, tmp_path):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", *flags])
    _refused(result, *words)
    assert not (tmp_path / "r").exists()  # refused before anything is written


@pytest.mark.parametrize("flags,words", REFUSALS)
def test_eval_refuses(flags, words, small_cache):
    _refused(invoke(["eval", small_cache, "--model", MODEL, *flags]), *words)


def test_sigmoid_label_smoothing_hint_names_cdpo(small_cache, tmp_path):
    result = invoke(
        ["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--label-smoothing", "0.1"]
    )
    assert "hint:" in result.stderr and "--loss cdpo" in result.stderr


# ---------------------------------------------------------------- eval takes the run's loss options


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_cache) -> dict:
    """One-step runs with different loss options (ipo at β 0.5, and the defaults)."""
    root = tmp_path_factory.mktemp("loss-option-runs")
    runs = {"ipo": (root / "ipo", ["--loss", "ipo", "--beta", "0.5"]), "sigmoid": (root / "sigmoid", [])}
    for out, flags in runs.values():
        result = invoke(
            [
                "train",
                small_cache,
                "--model",
                MODEL,
                "--out",
                out,
                "--max-steps",
                1,
                "--lr",
                "1e-3",
                "--quiet",
                *flags,
            ]
        )
        assert result.exit_code == 0, result.stderr
    return {name: out for name, (out, _) in runs.items()}


def _eval(cache, *args) -> dict:
    result = invoke(["eval", cache, *args, "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_eval_takes_loss_options_from_the_run(small_cache, two_runs):
    from_run = _eval(small_cache, "--model", two_runs["ipo"])
    assert from_run["loss_options"]["loss"] == "ipo" and from_run["loss_options"]["beta"] == 0.5
    assert from_run["loss_options_from"] == [str(two_runs["ipo"] / "run_config.json")]
    explicit = _eval(small_cache, "--model", two_runs["ipo"], "--loss", "ipo", "--beta", "0.5")
    assert from_run["models"][0]["loss"] == explicit["models"][0]["loss"]
    # The defaults (sigmoid at β 0.1) give another number, so the test above can tell them apart.
    defaults = _eval(small_cache, "--model", MODEL)
    assert defaults["loss_options"]["loss"] == "sigmoid" and defaults["loss_options_from"] == []
    assert (
        from_run["models"][0]["loss"]
        != _eval(small_cache, "--model", two_runs["ipo"], "--loss", "sigmoid", "--beta", "0.1")["models"][0][
            "loss"
        ]
    )


def test_eval_explicit_flags_win_option_by_option(small_cache, two_runs):
    summary = _eval(small_cache, "--model", two_runs["ipo"], "--beta", "0.2")
    assert summary["loss_options"]["beta"] == 0.2 and summary["loss_options"]["loss"] == "ipo"


def test_eval_checkpoint_takes_its_runs_options(small_cache, two_runs):
    summary = _eval(small_cache, "--model", two_runs["ipo"] / "checkpoint-1")
    assert summary["loss_options"]["loss"] == "ipo"


def test_eval_of_runs_with_different_loss_options_is_refused(small_cache, two_runs):
    result = invoke(["eval", small_cache, "--model", two_runs["ipo"], "--model", two_runs["sigmoid"]])
    _refused(result, "different loss options", "ipo", "sigmoid")
    # Given explicitly, the differing options no longer need to agree.
    summary = _eval(
        small_cache,
        "--model",
        two_runs["ipo"],
        "--model",
        two_runs["sigmoid"],
        "--loss",
        "sigmoid",
        "--beta",
        "0.1",
    )
    assert len(summary["models"]) == 2 and summary["loss_options_from"] != []


def test_eval_loss_options_in_a_config_file_count_as_given(small_cache, two_runs, tmp_path):
    config = tmp_path / "eval.toml"
    config.write_text('[eval]\nloss = "ipo"\nbeta = 0.3\n')
    summary = _eval(
        small_cache, "--model", two_runs["ipo"], "--model", two_runs["sigmoid"], "--config", config
    )
    assert summary["loss_options"]["loss"] == "ipo" and summary["loss_options"]["beta"] == 0.3
