"""HF Trainer's run-summary metrics: train_runtime, train_samples_per_second, train_steps_per_second,
train_loss in `dpo train --json` and as the last metrics line; eval_runtime in eval results.

Expected values come from the run's own metrics.jsonl and HF's definitions (transformers'
`_finalize_training`): train_loss is the mean of the per-step losses this process ran."""

from __future__ import annotations

import json

import pytest

from conftest import MODEL, invoke, read_jsonl
from dpocli.train.run_summary import TrainTotals

SUMMARY = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")


def _train(cache, out, *extra):
    result = invoke(["train", cache, "--model", MODEL, "--out", out, "--json", "--quiet", *extra])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_summary_follows_hf_definitions(small_cache, tmp_path):
    run = tmp_path / "run"
    summary = _train(small_cache, run, "--max-steps", 4, "--batch-size", 4, "--grad-accum", 2, "--lr", "1e-3")
    records = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert summary["train_loss"] == pytest.approx(sum(r["loss"] for r in steps) / 4, rel=1e-12)
    runtime = summary["train_runtime"]
    assert 0 < runtime <= summary["seconds"]
    # max_steps given: HF schedules max_steps x (batch x grad_accum x ranks) = 4 x 8 samples
    assert summary["train_samples_per_second"] == pytest.approx(32 / runtime, rel=1e-3)
    assert summary["train_steps_per_second"] == pytest.approx(4 / runtime, rel=1e-3)
    assert records[-1] == {"step": 4, **{k: summary[k] for k in SUMMARY}}  # HF's last log line


def test_epoch_runs_count_the_cache_pairs(small_cache, tmp_path):
    summary = _train(small_cache, tmp_path / "run", "--batch-size", 16)  # 48 pairs: 3 steps
    assert summary["steps"] == 3
    assert summary["train_samples_per_second"] == pytest.approx(48 / summary["train_runtime"], rel=1e-3)


def test_resumed_run_averages_only_its_own_steps(small_cache, tmp_path, monkeypatch):
    """As HF: train_loss of a resumed train() covers the steps after the checkpoint."""
    import dpocli.train.loop as train_mod
    real, calls = train_mod.compute_loss, {"n": 0}

    def interrupt_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    run = tmp_path / "run"
    args = ("--max-steps", 5, "--batch-size", 4, "--lr", "1e-3")
    with monkeypatch.context() as m:
        m.setattr(train_mod, "compute_loss", interrupt_in_step_3)
        result = invoke(["train", small_cache, "--model", MODEL, "--out", run, "--quiet", *args])
        assert result.exit_code == 130
    summary = _train(small_cache, run, *args, "--resume")
    losses = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert summary["train_loss"] == pytest.approx((losses[3] + losses[4] + losses[5]) / 3, rel=1e-12)
    assert summary["train_steps_per_second"] == pytest.approx(3 / summary["train_runtime"], rel=1e-3)


def test_totals_ignore_eval_records_and_a_run_with_nothing_left():
    totals = TrainTotals(t_start=0.0)
    assert totals.summary(10, 5)["train_loss"] is None  # HF would print 0.0: there is no loss
    totals.write({"step": 1, "loss": 0.5})
    totals.write({"step": 1, "eval_loss": 9.0})
    totals.write({"step": 2, "loss": 0.25})
    assert totals.steps == 2 and totals.summary(10, 5)["train_loss"] == 0.375


def test_eval_runtime_in_periodic_and_standalone_eval(small_cache, tmp_path):
    run = tmp_path / "run"
    _train(small_cache, run, "--max-steps", 2, "--batch-size", 8, "--eval-cache", small_cache,
           "--eval-every", 1)
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:  # HF's evaluate() names; 48 pairs scored
        assert r["eval_runtime"] > 0
        assert r["eval_samples_per_second"] == pytest.approx(48 / r["eval_runtime"], rel=1e-2)
    result = invoke(["eval", small_cache, "--model", run, "--json"])
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["models"][0]
    assert entry["eval_runtime"] > 0 and "runtime" not in entry
    assert entry["eval_samples_per_second"] == pytest.approx(48 / entry["eval_runtime"], rel=1e-2)
