"""--report-to: sinks receive every metrics.jsonl record; missing packages are usage errors."""

from __future__ import annotations

import sys
import types

from conftest import MODEL, invoke, read_jsonl


def test_wandb_sink_receives_the_same_records(small_cache, tmp_path, monkeypatch):
    logged, finished = [], []
    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")  # importlib.util.find_spec looks for it
    fake.init = lambda **kwargs: types.SimpleNamespace(finish=lambda: finished.append(True))
    fake.log = lambda values, step: logged.append((step, values))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    run = tmp_path / "run"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 3,
                     "--batch-size", 4, "--report-to", "wandb", "--quiet"])
    assert result.exit_code == 0, result.stderr
    records = read_jsonl(run / "metrics.jsonl")
    assert [step for step, _ in logged] == [r["step"] for r in records]
    assert logged[-1][1]["loss"] == records[-1]["loss"] and finished == [True]


def test_unknown_or_missing_sink_is_refused_before_writing(small_cache, tmp_path, monkeypatch):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "a", "--report-to", "mlflow"])
    assert result.exit_code == 2 and "mlflow" in result.stderr and not (tmp_path / "a").exists()
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "b", "--report-to", "tensorboard"])
    assert result.exit_code == 2 and "pip install tensorboard" in result.stderr
    assert not (tmp_path / "b").exists()
