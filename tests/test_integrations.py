"""--report-to: sinks receive every metrics.jsonl record under HF Trainer's dashboard keys; missing
packages are usage errors. Each sink's package is replaced by a fake module in sys.modules."""

from __future__ import annotations

import sys
import types

from conftest import MODEL, invoke, read_jsonl


def _fake_installed(monkeypatch, name: str, module: types.ModuleType) -> None:
    module.__spec__ = types.SimpleNamespace(name=name)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())


def _train(small_cache, run, report_to, *extra):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 2,
                     "--batch-size", 8, "--eval-cache", small_cache, "--eval-every", 1,
                     "--report-to", report_to, "--quiet", *extra])
    assert result.exit_code == 0, result.stderr
    return read_jsonl(run / "metrics.jsonl")


# HF Trainer's end-of-run metrics, metrics.jsonl's last line (run_summary.py)
RUN_SUMMARY = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")


def test_wandb_gets_hf_keys_against_the_global_step(small_cache, tmp_path, monkeypatch):
    logged, finished, defined, summary = [], [], [], {}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: types.SimpleNamespace(finish=lambda: finished.append(True), summary=summary)
    fake.log = lambda values: logged.append(values)
    fake.define_metric = lambda name, **kw: defined.append((name, kw.get("step_metric")))
    _fake_installed(monkeypatch, "wandb", fake)
    records = _train(small_cache, tmp_path / "run", "wandb")
    assert [v["train/global_step"] for v in logged] == [r["step"] for r in records]  # every record
    train, evals = logged[0], logged[1]
    assert train["train/loss"] == records[0]["loss"]
    assert train["train/rewards/chosen"] == records[0]["rewards/chosen"]
    assert train["train/learning_rate"] == records[0]["learning_rate"]
    assert evals["eval/loss"] == records[1]["eval_loss"] and "eval/runtime" in evals
    assert evals["eval/samples_per_second"] == records[1]["eval_samples_per_second"]
    assert not [k for v in logged for k in v if not k.startswith(("train/", "eval/"))]
    assert defined == [("train/global_step", None), ("*", "train/global_step")] and finished == [True]
    # HF's WandbCallback: the run summary goes to the W&B run's summary, not to a chart
    assert summary == {k: records[-1][k] for k in RUN_SUMMARY} and summary["train_runtime"] > 0
    assert logged[-1] == {"train/global_step": 2}


def test_tensorboard_gets_hf_tags_at_the_step(small_cache, tmp_path, monkeypatch):
    scalars, dirs = [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            dirs.append(log_dir)

        def add_text(self, *args):
            pass

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    _fake_installed(monkeypatch, "torch.utils.tensorboard", fake)
    run = tmp_path / "run"
    records = _train(small_cache, run, "tensorboard")
    assert dirs == [str(run / "tensorboard")]
    assert ("train/loss", records[0]["loss"], 1) in scalars
    assert ("eval/loss", records[1]["eval_loss"], 1) in scalars
    assert ("train/grad_norm", records[2]["grad_norm"], 2) in scalars
    evals = records[1]
    for key in ("eval_runtime", "eval_samples_per_second"):  # HF's evaluate() speed metrics
        assert (f"eval/{key[5:]}", evals[key], 1) in scalars
    summary = records[-1]
    assert set(RUN_SUMMARY) <= set(summary) and summary["step"] == 2
    for key in RUN_SUMMARY:  # HF's rewrite_logs: train_runtime -> train/train_runtime, at the last step
        assert (f"train/{key}", summary[key], 2) in scalars


def test_mlflow_gets_the_keys_as_logged_and_stores_runs_in_the_run_folder(small_cache, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("mlflow")
    fake.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    fake.start_run = lambda run_name: calls.append(("start", run_name))
    fake.log_params = lambda params: calls.append(("params", params))
    fake.log_metrics = lambda metrics, step: calls.append(("metrics", metrics, step))
    fake.end_run = lambda: calls.append(("end",))
    _fake_installed(monkeypatch, "mlflow", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    records = _train(small_cache, run, "mlflow")
    assert calls[0] == ("uri", (run / "mlruns").resolve().as_uri()) and calls[1] == ("start", "run")
    assert calls[2][0] == "params" and calls[2][1]["loss"] == "sigmoid"
    metrics = [c for c in calls if c[0] == "metrics"]
    assert [step for _, _, step in metrics] == [r["step"] for r in records]
    assert metrics[0][1]["rewards/chosen"] == records[0]["rewards/chosen"]  # HF: names unchanged
    assert metrics[1][1]["eval_loss"] == records[1]["eval_loss"]
    assert metrics[1][1]["eval_runtime"] == records[1]["eval_runtime"]
    assert metrics[-1][1] == {k: records[-1][k] for k in RUN_SUMMARY}
    assert calls[-1] == ("end",)
    # the store is listed in the run's record, so --overwrite may replace it
    assert "mlruns" in (run / "run_record.json").read_text()


def test_unknown_or_missing_sink_is_refused_before_writing(small_cache, tmp_path, monkeypatch):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "a", "--report-to", "comet"])
    assert result.exit_code == 2 and "comet" in result.stderr and not (tmp_path / "a").exists()
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    for sink in ("tensorboard", "mlflow"):
        result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "b",
                         "--report-to", sink])
        assert result.exit_code == 2 and f"pip install {sink}" in result.stderr
        assert not (tmp_path / "b").exists()
