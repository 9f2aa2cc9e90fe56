"""MoE router load-balancing loss (`--router-aux-loss-coef`, TRL's `router_aux_loss_coef`).

A tiny Mixtral (random weights from a fixed seed, the sample tokenizer) is built here; TRL 1.16's
3-step trajectory on it, with the config's coefficient (TRL's default) and with 0.1, was recorded by
tests/fixtures/make_trl_moe.py, which builds the same model with `build_tiny_mixtral`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import MODEL, SAMPLE, invoke, read_jsonl, write_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "trl_moe.json"


def build_tiny_mixtral(out: Path) -> float:
    """Save the tiny Mixtral to `out`; returns the sum of its weights (to check a rebuild)."""
    import torch
    import transformers as tf
    base = tf.AutoConfig.from_pretrained(MODEL)
    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=base.vocab_size, hidden_size=32, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                              bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                              pad_token_id=base.pad_token_id, tie_word_embeddings=False)
    model = tf.MixtralForCausalLM(config)
    model.save_pretrained(out)
    tf.AutoTokenizer.from_pretrained(MODEL).save_pretrained(out)
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def standard_rows(n: int) -> list[dict]:
    rows = [r for r in read_jsonl(SAMPLE / "train.jsonl") if "prompt" in r and isinstance(r["chosen"], str)]
    return [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in rows[:n]]


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict:
    trl = json.loads(FIXTURE.read_text())
    root = tmp_path_factory.mktemp("moe")
    weight_sum = build_tiny_mixtral(root / "model")
    assert weight_sum == pytest.approx(trl["weight_sum"], abs=1e-6)  # the fixture's model, rebuilt
    rows = standard_rows(trl["settings"]["rows"])
    assert [r["id"] for r in rows] == trl["row_ids"]
    result = invoke(["precompute-ref", write_jsonl(root / "rows.jsonl", rows), "--model", root / "model",
                     "--out", root / "cache", "--quiet"])
    assert result.exit_code == 0, result.stderr
    return {"trl": trl, "model": root / "model", "cache": root / "cache"}


def _eval(cache, *args) -> dict:
    result = invoke(["eval", cache, *args, "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_eval_batches_are_trls_one_eval_batch(moe):
    """The router loss is a statistic of a forward's tokens: dpocli's eval equals TRL's only over the
    same batches. The fixture's TRL eval ran all rows as one batch; so does the replay of this cache."""
    from dpocli.cache.store import load_cache
    from dpocli.scoring.replay import plan_like_precompute
    manifest, data = load_cache(moe["cache"])
    assert [len(b) for b in plan_like_precompute(data, manifest)] == [moe["trl"]["settings"]["rows"]]


@pytest.mark.parametrize("run", ["config_default", "coef_0.1"])
def test_eval_loss_adds_the_router_loss_as_trl(run, moe):
    """`dpo eval` of the untrained model: TRL's eval_loss (ln 2 + coef x aux_loss here) and eval_aux_loss."""
    coef = {"config_default": 0.02, "coef_0.1": 0.1}[run]
    extra = ["--router-aux-loss-coef", 0.1] if run == "coef_0.1" else []
    m = _eval(moe["cache"], "--model", moe["model"], *extra)["models"][0]
    want = moe["trl"]["evals"][run]["before"]
    assert m["aux_loss"] == pytest.approx(want["eval_aux_loss"], abs=1e-5)
    assert m["loss"] == pytest.approx(want["eval_loss"], abs=1e-5)
    assert m["loss"] == pytest.approx(math.log(2) + coef * m["aux_loss"], abs=1e-12)  # margins exactly 0
    off = _eval(moe["cache"], "--model", moe["model"], "--router-aux-loss-coef", 0)["models"][0]
    assert "aux_loss" not in off and off["loss"] == math.log(2)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["config_default", "coef_0.1"])
def test_trajectory_with_router_aux_loss_equals_trl(run, moe, tmp_path):
    """TRL's 3 steps, then its eval of the trained model: as periodic eval at step 3 and as `dpo eval`
    of the run (which takes the run's --router-aux-loss-coef)."""
    s = moe["trl"]["settings"]
    extra = ["--router-aux-loss-coef", 0.1] if run == "coef_0.1" else []
    result = invoke(["train", moe["cache"], "--model", moe["model"], "--out", tmp_path / "r", "--no-shuffle",
                     "--max-steps", s["steps"], "--batch-size", s["batch_size"], "--lr", s["lr"], "--quiet",
                     "--eval-cache", moe["cache"], "--eval-every", s["steps"], *extra])
    assert result.exit_code == 0, result.stderr
    records = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    got = [r for r in records if "loss" in r]
    want = moe["trl"]["runs"][run]
    assert len(got) == len(want) == s["steps"]
    for g, t in zip(got, want):
        assert g["aux_loss"] > 0
        for key in ("loss", "aux_loss", "rewards/margins", "logps/chosen", "entropy", "grad_norm"):
            assert abs(g[key] - t[key]) <= 1e-4, (run, g["step"], key, g[key], t[key])
    periodic = next(r for r in records if "eval_loss" in r)
    direct = _eval(moe["cache"], "--model", tmp_path / "r")["models"][0]
    for key, value in moe["trl"]["evals"][run]["after"].items():
        assert abs(periodic[key] - value) <= 1e-5, (run, key, periodic[key], value)  # seen: <= 2e-6
        assert direct[key[5:]] == periodic[key], key  # one eval path: bit for bit


def test_zero_coefficient_turns_it_off(moe, tmp_path):
    result = invoke(["train", moe["cache"], "--model", moe["model"], "--out", tmp_path / "r",
                     "--max-steps", 1, "--router-aux-loss-coef", 0, "--quiet"])
    assert result.exit_code == 0, result.stderr
    first = read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]
    assert "aux_loss" not in first and first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_refused_for_a_model_without_router_logits(small_cache, tmp_path):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r",
                     "--router-aux-loss-coef", 0.01])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--router-aux-loss-coef" in lines[0] and "Mixture-of-Experts" in lines[0]
    assert not (tmp_path / "r").exists()
