"""Dropout is off by default (TRL's disable_dropout=True), for Dropout modules and for the float
probabilities attention code reads (Llama's `attention_dropout`), and `--keep-dropout` keeps it.

The end-to-end tests train a copy of the tiny Llama whose config says `attention_dropout: 0.3` for
5 steps and compare with (a) the same weights without dropout in the config, trained by dpocli, and
(b) TRL 1.16's trajectory for those weights, recorded by tests/fixtures/make_trl_dropout.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import (
    MODEL,
    SAMPLE,
    compared_keys,
    invoke,
    read_jsonl,
    ref_values,
    smallest_margin_per_step,
    write_jsonl,
)
from dpocli.model.load import active_dropout, disable_dropout, load_causal_lm

TRL = json.loads((Path(__file__).parent / "fixtures" / "trl_dropout.json").read_text())
SETTINGS = TRL["settings"]
TRAIN_ARGS = ["--no-shuffle", "--max-steps", 5, "--batch-size", SETTINGS["batch_size"],
              "--lr", SETTINGS["lr"], "--beta", SETTINGS["beta"], "--seed", SETTINGS["seed"], "--quiet"]


# ---------------------------------------------------------------- disable_dropout on three families

def _tiny(family: str):
    """A randomly initialised 1-layer model of `family` with every dropout its config has at 0.3."""
    import transformers as tf
    common = dict(vocab_size=64, num_hidden_layers=1, num_attention_heads=2, hidden_size=16)
    if family == "llama":  # attention dropout: a float in the attention module (copied from config)
        config = tf.LlamaConfig(**common, intermediate_size=32, num_key_value_heads=2, attention_dropout=0.3)
        model = tf.LlamaForCausalLM(config)
    elif family == "gpt2":  # nn.Dropout modules built from resid_pdrop, embd_pdrop, attn_pdrop
        config = tf.GPT2Config(vocab_size=64, n_layer=1, n_head=2, n_embd=16, resid_pdrop=0.3,
                               embd_pdrop=0.3, attn_pdrop=0.3)
        model = tf.GPT2LMHeadModel(config)
    else:  # falcon reads config.attention_dropout / hidden_dropout at every forward
        config = tf.FalconConfig(**common, attention_dropout=0.3, hidden_dropout=0.3,
                                 new_decoder_architecture=False)
        model = tf.FalconForCausalLM(config)
    return model.train()


def _two_forwards_agree(model) -> bool:
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(ids).logits
        torch.manual_seed(1)
        return torch.equal(first, model(ids).logits)


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon"])
def test_disable_dropout_makes_train_mode_deterministic(family):
    model = _tiny(family)
    assert active_dropout(model) and not _two_forwards_agree(model)  # dropout is really on
    turned_off = disable_dropout(model)
    assert turned_off and active_dropout(model) == []
    assert model.training and _two_forwards_agree(model)


def test_active_dropout_names_the_config_field():
    assert "attention_dropout=0.3" in active_dropout(_tiny("llama"))
    assert active_dropout(load_causal_lm(str(MODEL))) == []  # the bundled model has none


# ---------------------------------------------------------------- end to end with the CLI

@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> Path:
    """sample_data/tiny-llama with `attention_dropout: 0.3` in its config (same weights)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama-dropout"
    shutil.copytree(MODEL, folder)
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.3
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    """The rows of the TRL fixture: the first standard rows of sample_data/train.jsonl."""
    rows = [r for r in read_jsonl(SAMPLE / "train.jsonl") if "prompt" in r and isinstance(r["chosen"], str)]
    rows = rows[:SETTINGS["rows"]]
    assert [r["id"] for r in rows] == TRL["row_ids"]
    return write_jsonl(tmp_path_factory.mktemp("data") / "standard.jsonl", rows)


def _precompute(tmp_path_factory, rows_file, model) -> Path:
    out = tmp_path_factory.mktemp("caches") / "c"
    result = invoke(["precompute-ref", rows_file, "--model", model, "--out", out, "--quiet",
                     "--max-length", SETTINGS["max_length"]])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory, rows_file, dropout_model) -> dict[str, Path]:
    return {"dropout": _precompute(tmp_path_factory, rows_file, dropout_model),
            "plain": _precompute(tmp_path_factory, rows_file, MODEL)}


def _train(out: Path, cache: Path, model: Path, *extra) -> tuple:
    with smallest_margin_per_step() as smallest_margin:
        result = invoke(["train", cache, "--model", model, "--out", out, "--json", *TRAIN_ARGS, *extra])
    steps = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
             if (out / "metrics.jsonl").exists() else [])
    steps = [s for s in steps if "loss" in s]
    for record, margin in zip(steps, smallest_margin):
        record["smallest |margin|"] = margin
    return result, steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory, caches, dropout_model) -> dict:
    root = tmp_path_factory.mktemp("runs")
    dropout = _train(root / "dropout", caches["dropout"], dropout_model)
    plain = _train(root / "plain", caches["plain"], MODEL)
    for result, _ in (dropout, plain):
        assert result.exit_code == 0, result.stderr
    return {"dropout": dropout, "plain": plain}


def test_precompute_is_unaffected_by_dropout_in_the_config(caches):
    # precompute runs the reference in eval mode (and with dropout zeroed): identical values.
    assert ref_values(caches["dropout"]) == ref_values(caches["plain"])


def test_default_training_passes_the_step0_check(runs):
    summary = json.loads(runs["dropout"][0].stdout)
    assert summary["step0_policy_is_reference"] is True
    assert summary["step0_max_abs_diff"] <= 1e-4
    assert summary["steps"] == 5


def test_trajectory_equals_the_no_dropout_model(runs):
    got, want = runs["dropout"][1], runs["plain"][1]
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert abs(g[key] - w[key]) <= 1e-6, (g["step"], key, g[key], w[key])


def test_trajectory_equals_trl_without_dropout(runs):
    """TRL 1.16 on the same weights with `attention_dropout: 0.0`. (TRL on the 0.3 config trains with
    attention dropout on, since its disable_dropout only touches nn.Dropout modules: a deliberate
    difference, recorded in the fixture: its first loss is not ln 2.)"""
    trl = TRL["runs"]["no_dropout"]
    got = runs["dropout"][1]
    assert len(got) == len(trl) == 5
    assert math.isclose(trl[0]["loss"], math.log(2), abs_tol=1e-6)
    assert abs(TRL["runs"]["attention_dropout_0.3"][0]["loss"] - math.log(2)) > 1e-2
    for g, t in zip(got, trl):
        keys = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies")
        # A margin within the parity tolerance of 0 may fall on the other side in TRL.
        for key in compared_keys(keys, g["smallest |margin|"], tie=1e-4):
            assert abs(g[key] - t[key]) <= 1e-4, (g["step"], key, g[key], t[key])


def test_keep_dropout_fails_the_step0_check_naming_dropout(tmp_path, caches, dropout_model):
    result, _ = _train(tmp_path / "r", caches["dropout"], dropout_model, "--keep-dropout")
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    error = [line for line in lines if line.startswith("error:")]
    hint = [line for line in lines if line.startswith("hint:")]
    assert len(error) == 1 and "step-0 check failed" in error[0]
    assert len(hint) == 1 and "--keep-dropout" in hint[0] and "attention_dropout=0.3" in hint[0]


def test_lora_dropout_without_keep_dropout_is_refused(tmp_path, small_cache):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--lora-r", 4,
                     "--lora-dropout", 0.1])
    assert result.exit_code == 2
    error = result.stderr.strip().splitlines()[0]
    assert error.startswith("error:") and "--lora-dropout" in error
    assert not (tmp_path / "r").exists()
