"""--config TOML files, --print-config, and the resolved config written next to a run."""

from __future__ import annotations

import json
import re

from conftest import MODEL, invoke, read_jsonl

try:
    import tomllib
except ImportError:  # Python 3.10: the tomli backport, a dependency there
    import tomli as tomllib


def test_print_config_is_valid_toml_with_the_defaults():
    result = invoke(["train", "--print-config"])
    assert result.exit_code == 0
    values = tomllib.loads(result.stdout)
    assert values["beta"] == 0.1 and values["lr"] == 1e-6 and values["loss"] == "sigmoid"
    assert values["batch-size"] == 8 and values["scheduler"] == "linear"


def test_file_values_apply_and_flags_win(small_cache, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{MODEL}"\nlr = 0.001\n[train]\nmax-steps = 2\nbatch_size = 4\nbeta = 0.5\n')
    run = tmp_path / "run"
    result = invoke(["train", small_cache, "--out", run, "--config", cfg, "--beta", 0.2, "--quiet"])
    assert result.exit_code == 0, result.stderr
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["lr"] == 0.001 and saved["max_steps"] == 2 and saved["batch_size"] == 4
    assert saved["beta"] == 0.2  # the flag beat the file
    assert len([r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]) == 2


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("learning-rat = 1\n")
    result = invoke(["train", "c", "--model", "m", "--out", "o", "--config", cfg])
    assert result.exit_code == 2
    assert "learning-rat" in result.stderr and str(cfg) in result.stderr


def test_invalid_toml_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text("lr = = 1\n")
    result = invoke(["eval", "c", "--model", "m", "--config", cfg])
    assert result.exit_code == 2 and "not valid TOML" in result.stderr


def test_resolved_config_replays_the_run_exactly(small_cache, tmp_path):
    first = tmp_path / "first"
    assert (
        invoke(
            [
                "train",
                small_cache,
                "--model",
                MODEL,
                "--out",
                first,
                "--max-steps",
                2,
                "--batch-size",
                4,
                "--lr",
                "1e-3",
                "--quiet",
            ]
        ).exit_code
        == 0
    )
    resolved = first / "config.resolved.toml"
    assert tomllib.loads(resolved.read_text())["max-steps"] == 2
    second = tmp_path / "second"
    assert invoke(["train", "--config", resolved, "--out", second]).exit_code == 0
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def toml_keys(text: str) -> list[str]:
    """Keys of a --print-config / config.resolved.toml text, unset (commented-out) ones included."""
    return re.findall(r"^(?:# )?([\w-]+) =", text, flags=re.MULTILINE)


def test_print_config_and_resolved_config_list_the_same_keys(small_cache, tmp_path):
    """Both come from one function; a run's file must be a complete --config for its command."""
    run = tmp_path / "run"
    assert (
        invoke(["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 1, "--quiet"]).exit_code
        == 0
    )
    for command, resolved in (
        ("train", run / "config.resolved.toml"),
        ("precompute-ref", small_cache / "config.resolved.toml"),
    ):
        printed = toml_keys(invoke([command, "--print-config"]).stdout)
        written = toml_keys(resolved.read_text())
        assert printed == written, command
        assert {"json", "quiet", "seed" if command == "train" else "max-length"} <= set(printed)
        assert {"config", "print-config", "help"}.isdisjoint(printed)


def test_print_config_title_names_the_command_as_typed(tmp_path):
    """The cache subcommands' titles once read `dpo info` / `dpo verify` (click's info_name)."""
    for command in (["cache", "info"], ["cache", "verify"], ["train"], ["report"]):
        result = invoke([*command, "--print-config"])
        assert result.exit_code == 0, result.stderr
        assert result.stdout.splitlines()[0] == f"# dpo {' '.join(command)} options; use with --config"


def test_unknown_config_key_names_the_command_as_typed(small_cache, tmp_path):
    cfg = tmp_path / "info.toml"
    cfg.write_text("bogus = 1\n")
    result = invoke(["cache", "info", small_cache, "--config", cfg])
    assert result.exit_code == 2
    assert "field 'bogus' is not an option of `dpo cache info`" in result.stderr
    assert "see `dpo cache info --help`" in result.stderr
