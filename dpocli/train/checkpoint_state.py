"""A checkpoint's resumable state: what trainer_state.json and optimizer.pt / trainer_state.pt
hold, how they are read back (checked: `read_checkpoint`) and applied (`restore`).

A resume reads the newest checkpoint before anything is written (checkpoint.inspect_run_dir):
its checksums are verified (folder_checksums.py), each state file is read through
state_files.StateFile (a missing or mistyped field is `error: FILE: field 'x' ...`, exit 2), and a
state that contradicts the run is refused: a step other than the folder's N or beyond the run's
length, another global batch. A saved state that does not fit the optimizer or scheduler is
refused the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpocli import __version__
from dpocli.errors import DpocliError
from dpocli.io import folder_checksums
from dpocli.io.state_files import StateFile
from dpocli.model import lora, sharding
from dpocli.model.distributed import load_optimizer_state

STATE_JSON = "trainer_state.json"
STATE_PT = "optimizer.pt"
SHARDED_STATE_PT = "trainer_state.pt"  # a sharded checkpoint's scheduler and RNG (optimizer: dcp/)


@dataclass
class TrainState:
    """Where a run stands: all a resume needs, since the batch order is a function of (seed, epoch)."""

    step: int = 0
    epoch: int = 0
    micro_index: int = 0  # global micro-batches of `epoch` already done
    num_tokens: int = 0
    step0: dict = field(default_factory=dict)  # the step-0 check's findings, kept for the summary
    last_saved: int | None = None  # the step of the newest checkpoint

    def record(self, global_batch: int, world_size: int) -> dict:
        """trainer_state.json of a checkpoint at this state."""
        return {"step": self.step, "epoch": self.epoch, "micro_index": self.micro_index,
                "global_batch": global_batch, "world_size": world_size, "num_tokens": self.num_tokens,
                "step0": self.step0, "dpocli_version": __version__}


@dataclass
class CheckpointState:
    """A checkpoint's state files, read and checked (`read_checkpoint`)."""

    step: int
    folder: Path
    state: StateFile  # trainer_state.json
    tensors: StateFile  # optimizer.pt or trainer_state.pt

    def train_state(self) -> TrainState:
        s = self.state
        return TrainState(step=s.count("step"), epoch=s.count("epoch"), micro_index=s.count("micro_index"),
                          num_tokens=s.count("num_tokens"), step0=s.get("step0", dict, {}),
                          last_saved=self.step)


def read_checkpoint(step: int, folder: Path, total_steps: int, global_batch: int) -> CheckpointState:
    """Verify a checkpoint's checksums and read its state files, refusing (exit 2, naming the file
    and field) a damaged one or one that contradicts this run. Reads only."""
    hint = f"delete {folder} to resume from the checkpoint before it (or start over with --overwrite)"
    state = StateFile.read_json(folder / STATE_JSON, hint=hint)
    for name in ("step", "epoch", "micro_index", "num_tokens"):
        state.count(name)
    state.get("step0", dict, {})
    if state.data["step"] != step:
        raise state.refuse(f"is {state.data['step']}, but the folder is checkpoint-{step}", "step")
    if step > total_steps:
        raise state.refuse(f"is {step}, beyond this run's {total_steps} steps (--max-steps / --epochs)",
                           "step")
    saved_batch = state.count("global_batch", global_batch)
    if saved_batch != global_batch:
        raise DpocliError(
            f"was saved with a global batch of {saved_batch} pairs (batch size x ranks); "
            f"this run has {global_batch}", file=folder, field="global_batch",
            hint=f"choose --batch-size so that batch size x ranks = {saved_batch}")
    sharded = is_sharded_checkpoint(folder)
    tensors = StateFile.read_torch(folder / (SHARDED_STATE_PT if sharded else STATE_PT), hint=hint)
    for name, kind in ((("scheduler", dict),) + ((("optimizer", dict),) if not sharded else ())
                       + (("rng", dict), ("rng.python", tuple), ("rng.torch", torch.Tensor))):
        tensors.get(name, kind)
    folder_checksums.verify(folder)  # after the fields, so that a damaged field is named as such
    return CheckpointState(step, folder, state, tensors)


def restore(saved: CheckpointState, model, optimizer, scheduler, sharded: bool) -> TrainState:
    """Load the optimizer, scheduler and RNG states of a checkpoint read by `read_checkpoint`."""
    folder, tensors = saved.folder, saved.tensors
    if is_sharded_checkpoint(folder):  # DCP reshards: saved by any number of ranks
        sharding.load_dcp(folder / sharding.DCP_DIR, model, optimizer,
                          trainable_only=lora.is_adapter_model(model))
    else:
        _load_field(tensors, "optimizer",
                    lambda: load_optimizer_state(model, optimizer, tensors.data["optimizer"], sharded))
    _load_field(tensors, "scheduler", lambda: scheduler.load_state_dict(tensors.data["scheduler"]))
    _load_field(tensors, "rng", lambda: set_rng_state(tensors.data["rng"]))
    return saved.train_state()


def _load_field(tensors: StateFile, name: str, load) -> None:
    """Apply one saved state; one that does not fit this run is the file's fault, not a bug."""
    try:
        load()
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        first = (str(err).splitlines() or [""])[0][:200]
        raise tensors.refuse(f"does not fit this run ({type(err).__name__}: {first})", name) from None


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / sharding.DCP_DIR / ".metadata").is_file()


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
