"""Optional metric sinks beside metrics.jsonl: `--report-to tensorboard,wandb,mlflow`.

Each sink is used only if its package is installed; asking for one that is not is a usage error
(exit 2) before training starts, not a crash at the first log line.

Keys follow HF Trainer's callbacks, so dashboards line up with TRL runs: TensorBoard and W&B get
`train/<key>` and `eval/<key>` (HF's `rewrite_logs`: `eval_loss` -> `eval/loss`, `loss` ->
`train/loss`), against the optimizer step (W&B: `train/global_step` as the x-axis, as HF defines it);
MLflow gets the keys as logged (HF's MLflowCallback does not rewrite them). metrics.jsonl keeps
dpocli's names. The end-of-run summary (train_runtime, ...) reaches every sink like any record,
except that W&B keeps it in the run's summary, as HF's WandbCallback does.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from dpocli.errors import DpocliError

KNOWN = ("tensorboard", "wandb", "mlflow")
# The folder each sink writes inside the run folder (listed in the run's record, so --overwrite may
# replace it); W&B and TensorBoard name theirs, MLflow's file store is put there unless
# MLFLOW_TRACKING_URI points elsewhere.
FOLDERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}
# HF's WandbCallback `single_value_scalars` (run_summary.py's; total_flos dpocli does not compute).
RUN_SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second",
                              "train_loss", "total_flos"})


def hf_keys(record: dict) -> dict:
    """A record's numbers under HF's dashboard keys: eval_* -> eval/*, the rest -> train/*."""
    return {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v
            for k, v in record.items() if k != "step" and _is_number(v)}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TensorBoardSink:
    def __init__(self, run_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DpocliError("needs the tensorboard package", field="--report-to",
                              hint="pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / FOLDERS["tensorboard"]))
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in config.items()))

    def write(self, record: dict) -> None:
        for tag, value in hf_keys(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise DpocliError("needs the wandb package", field="--report-to",
                              hint="pip install wandb (set WANDB_MODE=offline without network)") from None
        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir), config=config, name=run_dir.name)
        # HF's WandbCallback: every chart against the optimizer step, not W&B's own log counter.
        wandb.define_metric("train/global_step")
        wandb.define_metric("*", step_metric="train/global_step", step_sync=True)

    def write(self, record: dict) -> None:
        # HF's WandbCallback: the end-of-run totals go to the run's summary, not to a chart.
        for key in RUN_SUMMARY_KEYS.intersection(record):
            if _is_number(record[key]):
                self.run.summary[key] = record[key]
        rest = {k: v for k, v in record.items() if k not in RUN_SUMMARY_KEYS}
        self.wandb.log({**hf_keys(rest), "train/global_step": record["step"]})

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    def __init__(self, run_dir: Path, config: dict):
        try:
            import mlflow
        except ImportError:
            raise DpocliError("needs the mlflow package", field="--report-to",
                              hint="pip install mlflow") from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # else mlflow would write ./mlruns in the cwd
            mlflow.set_tracking_uri((run_dir / FOLDERS["mlflow"]).resolve().as_uri())
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v) for k, v in config.items()})

    def write(self, record: dict) -> None:
        # HF's MLflowCallback: numbers only, characters MLflow refuses replaced by "_".
        metrics = {re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", k): v for k, v in record.items()
                   if k != "step" and _is_number(v)}
        self.mlflow.log_metrics(metrics, step=record["step"])

    def close(self) -> None:
        self.mlflow.end_run()


def check(report_to: str | None) -> list[str]:
    """The requested sink names, checked (known, package installed) before anything is written."""
    names = [n.strip() for n in (report_to or "").split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in KNOWN:
            raise DpocliError(f"'{name}' is not one of {', '.join(KNOWN)}", field="--report-to")
        if importlib.util.find_spec(name) is None:
            raise DpocliError(f"'{name}' needs the {name} package", field="--report-to",
                              hint=f"pip install {name}")
    return names


def folders(report_to: str | None) -> list[str]:
    """The entries the requested sinks create inside the run folder."""
    return [FOLDERS[name] for name in check(report_to)]


def make_sinks(report_to: str | None, run_dir: Path, config: dict) -> list:
    names = check(report_to)
    classes = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}
    return [classes[name](run_dir, config) for name in names]
