"""Optional metric sinks beside metrics.jsonl: `--report-to tensorboard,wandb`.

Each sink is used only if its package is installed; asking for one that is not is a usage error
(exit 2) before training starts, not a crash at the first log line.
"""

from __future__ import annotations

from pathlib import Path

from dpocli.errors import DpocliError

KNOWN = ("tensorboard", "wandb")


class TensorBoardSink:
    def __init__(self, run_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DpocliError("needs the tensorboard package", field="--report-to",
                              hint="pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in config.items()))

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                # TensorBoard groups tags by their first "/" segment: train/... and eval/...
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
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

    def write(self, record: dict) -> None:
        self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def check(report_to: str | None) -> list[str]:
    """The requested sink names, checked (known, package installed) before anything is written."""
    import importlib.util
    names = [n.strip() for n in (report_to or "").split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in KNOWN:
            raise DpocliError(f"'{name}' is not one of {', '.join(KNOWN)}", field="--report-to")
        if importlib.util.find_spec(name) is None:
            raise DpocliError(f"'{name}' needs the {name} package", field="--report-to",
                              hint=f"pip install {name}")
    return names


def make_sinks(report_to: str | None, run_dir: Path, config: dict) -> list:
    names = check(report_to)
    classes = {"tensorboard": TensorBoardSink, "wandb": WandbSink}
    return [classes[name](run_dir, config) for name in names]
