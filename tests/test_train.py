"""`dpo train`: invariants, learning, exact resume, failure modes. Expected values are independent:
ln 2 and zero rewards from the DPO formula, an uninterrupted run for resume (schedules:
tests/test_schedule.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MODEL, invoke, qlora_unavailable, read_jsonl, write_jsonl
from dpocli.cache import store as cache


def train_args(cache_dir, out, *extra):
    return ["train", cache_dir, "--model", MODEL, "--out", out, "--quiet", *extra]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def bs1_cache(tmp_path_factory, sample_rows):
    """A cache precomputed one pair per forward, so batch-size-1 training sees identical shapes."""
    data = write_jsonl(tmp_path_factory.mktemp("d") / "p.jsonl", sample_rows[:16])
    out = tmp_path_factory.mktemp("c") / "bs1"
    assert invoke(["precompute-ref", data, "--model", MODEL, "--out", out, "--batch-size", 1,
                   "--quiet"]).exit_code == 0
    return out


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(bs1_cache, tmp_path):
    """DPO at π = π_ref: h = 0, so loss = -log σ(0) = ln 2, rewards 0, strict accuracy 0."""
    result = invoke(train_args(bs1_cache, tmp_path / "run", "--batch-size", 1, "--grad-accum", 8,
                               "--max-steps", 1, "--no-shuffle", "--json"))
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["loss"] == math.log(2)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert summary["step0_max_abs_diff"] == 0.0 and summary["step0_policy_is_reference"]


def test_metrics_log_has_trl_names_and_config_is_saved(small_cache, tmp_path):
    run = tmp_path / "run"
    assert invoke(train_args(small_cache, run, "--max-steps", 2, "--batch-size", 4)).exit_code == 0
    rec = read_jsonl(run / "metrics.jsonl")[0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "epoch",
                "tokens_per_s", "elapsed_s", "step"):
        assert key in rec, key
    config = json.loads((run / "run_config.json").read_text())
    assert config["batch_size"] == 4 and config["max_steps"] == 2 and config["beta"] == 0.1
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(run)  # final model at the top of RUN_DIR
    AutoTokenizer.from_pretrained(run)
    assert (run / "checkpoint-2" / "trainer_state.json").exists()


def test_grad_accum_equals_larger_batch(small_cache, tmp_path):
    """Loss of a step is the mean over all its pairs, however they are split into micro-batches."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--max-steps", 3, "--no-shuffle", "--lr", "1e-3"]
    assert invoke(train_args(small_cache, a, "--batch-size", 8, *common)).exit_code == 0
    assert invoke(train_args(small_cache, b, "--batch-size", 4, "--grad-accum", 2, *common)).exit_code == 0
    assert losses(a) == pytest.approx(losses(b), abs=1e-6)
    wa, wb = weights(a), weights(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_gradient_checkpointing_changes_memory_not_math(small_cache, tmp_path):
    common = ["--max-steps", 3, "--no-shuffle", "--lr", "1e-3", "--batch-size", 8]
    assert invoke(train_args(small_cache, tmp_path / "plain", *common)).exit_code == 0
    assert invoke(train_args(small_cache, tmp_path / "ckpt", *common, "--gradient-checkpointing")).exit_code == 0
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)


def _interrupt_after(monkeypatch, calls: int):
    """Make the (calls+1)-th loss computation raise KeyboardInterrupt, as Ctrl-C would."""
    import dpocli.train.loop as train_mod
    real = train_mod.compute_loss
    count = {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(train_mod, "compute_loss", flaky)


# One resume test for every way of training: the interrupted-then-resumed run ends with bitwise
# the same weights (or adapter) and the same loss trajectory as the uninterrupted one.
RESUME_CASES = {
    "full": ([], "model.safetensors"),
    "lora": (["--lora-r", 16, "--lora-alpha", 32, "--lora-target-modules", "all-linear"],
             "adapter_model.safetensors"),
    "packed, shared prompt": (["--packing", "--prefix-sharing"], "model.safetensors"),
    "qlora": (["--lora-r", 8, "--lora-target-modules", "all-linear", "--load-in-4bit"],
              "adapter_model.safetensors"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_interrupt_then_resume_is_bitwise_equal(small_cache, tmp_path, monkeypatch, case):
    extra, weights_file = RESUME_CASES[case]
    if "--load-in-4bit" in extra and qlora_unavailable():
        pytest.skip(qlora_unavailable())
    args = ["--max-steps", 8, "--batch-size", 4, "--lr", "1e-3", "--save-every", 3,
            "--warmup-steps", 2, "--scheduler", "cosine", *extra]
    full, part = tmp_path / "full", tmp_path / "part"
    assert invoke(train_args(small_cache, full, *args)).exit_code == 0

    with monkeypatch.context() as m:
        _interrupt_after(m, 5)  # dies inside step 6
        result = invoke(train_args(small_cache, part, *args))
    assert result.exit_code == 130
    assert "--resume" in result.stderr
    assert (part / "checkpoint-5").exists()  # Ctrl-C saves the last completed step
    assert invoke(train_args(small_cache, part, *args, "--resume")).exit_code == 0

    assert losses(part) == losses(full)  # same trajectory, no duplicated steps
    wf, wp = load_file(full / weights_file), load_file(part / weights_file)
    assert wf.keys() == wp.keys() and all(torch.equal(wf[k], wp[k]) for k in wf)


def test_resume_with_changed_arguments_is_refused(small_cache, tmp_path):
    run = tmp_path / "run"
    assert invoke(train_args(small_cache, run, "--max-steps", 1, "--batch-size", 4)).exit_code == 0
    result = invoke(train_args(small_cache, run, "--max-steps", 1, "--batch-size", 4, "--beta", 0.2, "--resume"))
    assert result.exit_code == 2 and "beta" in result.stderr
    # The global batch (batch size x ranks) must stay the same; the per-rank batch may change.
    result = invoke(train_args(small_cache, run, "--max-steps", 1, "--batch-size", 8, "--resume"))
    assert result.exit_code == 2 and "global batch" in result.stderr


def test_existing_run_dir_is_not_overwritten(small_cache, tmp_path):
    run = tmp_path / "run"
    assert invoke(train_args(small_cache, run, "--max-steps", 1)).exit_code == 0
    result = invoke(train_args(small_cache, run, "--max-steps", 1))
    assert result.exit_code == 2 and "already holds a dpocli run" in result.stderr
    assert invoke(train_args(small_cache, run, "--max-steps", 1, "--overwrite")).exit_code == 0


def test_nan_loss_stops_with_exit_1_and_keeps_last_checkpoint(small_cache, tmp_path, monkeypatch):
    import dpocli.train.loop as train_mod
    real = train_mod.compute_loss
    count = {"n": 0}

    def poisoned(inputs, spec):
        count["n"] += 1
        if count["n"] == 3:
            inputs = dataclasses.replace(inputs, policy_chosen_logps=inputs.policy_chosen_logps * float("nan"))
        return real(inputs, spec)
    monkeypatch.setattr(train_mod, "compute_loss", poisoned)
    run = tmp_path / "run"
    result = invoke(train_args(small_cache, run, "--max-steps", 5, "--batch-size", 4, "--save-every", 2))
    assert result.exit_code == 1
    assert "non-finite loss at step 3" in result.stderr and "checkpoint-2" in result.stderr
    assert (run / "checkpoint-2").exists() and not (run / "checkpoint-3").exists()


def _rewrite_ref_values(cache_dir: Path, delta: float) -> None:
    """Shift every cached reference value, keeping the cache internally consistent (checksums)."""
    import pyarrow.parquet as pq
    manifest = cache.read_manifest(cache_dir)
    for entry in manifest.shards:
        table = pq.read_table(cache_dir / entry["file"])
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
        cols["ref_chosen_logps"] = [v + delta for v in cols["ref_chosen_logps"]]
        new = cache.write_shard(cache_dir, entry["index"], cols, False, manifest.spec)
        entry["sha256"] = new["sha256"]
    cache.commit_manifest(cache_dir, manifest)


def test_step0_check_catches_a_cache_that_does_not_match_the_policy(small_prefs, tmp_path):
    cache_dir = tmp_path / "cache"
    assert invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", cache_dir, "--quiet"]).exit_code == 0
    _rewrite_ref_values(cache_dir, 0.5)
    result = invoke(train_args(cache_dir, tmp_path / "run", "--max-steps", 1))
    assert result.exit_code == 1 and "step-0 check failed" in result.stderr
    ok = invoke(train_args(cache_dir, tmp_path / "run2", "--max-steps", 1, "--skip-step0-check"))
    assert ok.exit_code == 0


def test_policy_with_another_tokenizer_is_refused(small_cache, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(MODEL, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    template = other / "chat_template.jinja"
    if template.exists():
        template.write_text("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
    else:
        config["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
        (other / "tokenizer_config.json").write_text(json.dumps(config))
    result = invoke(["train", small_cache, "--model", other, "--out", tmp_path / "run", "--max-steps", 1])
    assert result.exit_code == 2 and "tokenizer" in result.stderr
    ok = invoke(["train", small_cache, "--model", other, "--out", tmp_path / "run", "--max-steps", 1,
                 "--allow-tokenizer-mismatch", "--quiet"])
    assert ok.exit_code == 0


@pytest.mark.slow
def test_training_learns_the_sample_preference(trained_run, train_cache):
    """From the reference (accuracy 0 strict, probability 0.5) to > 0.9 accuracy on the train set."""
    result = invoke(["eval", train_cache, "--model", MODEL, "--model", trained_run, "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    ref, trained = json.loads(result.stdout)["models"]
    assert ref["rewards/accuracies"] == 0.0 and ref["preference_prob/mean"] == 0.5
    assert trained["rewards/accuracies"] > 0.9
    assert trained["rewards/margins"] > 0


@pytest.mark.slow
def test_torch_compile_changes_speed_not_math(small_cache, tmp_path):
    common = ["--max-steps", 2, "--no-shuffle", "--lr", "1e-3", "--batch-size", 8]
    assert invoke(train_args(small_cache, tmp_path / "eager", *common)).exit_code == 0
    result = invoke(train_args(small_cache, tmp_path / "compiled", *common, "--compile"))
    assert result.exit_code == 0, result.stderr
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-5)
