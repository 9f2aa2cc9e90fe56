"""Checkpoints: an HF-format model folder plus the trainer state needed to resume exactly.

A checkpoint is `RUN_DIR/checkpoint-<step>/` holding config.json + model.safetensors + tokenizer
files (loadable with `from_pretrained`), `trainer_state.json` (step, data position, RNG seeds) and
`optimizer.pt` (optimizer, scheduler and RNG states). It is written as a temporary folder and
renamed, so a checkpoint folder either exists complete or not at all; leftovers of a crash
(`checkpoint-N.tmp-*`) are ignored and removed by the next save.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

from dpocli.atomic import atomic_dir, atomic_write_json
from dpocli.errors import DpocliError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_JSON = "trainer_state.json"
STATE_PT = "optimizer.pt"


def save_model_folder(folder: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """HF format, safetensors, tokenizer included. `state_dict` overrides the module's own
    (used with FSDP, where rank 0 saves the gathered full weights)."""
    from dpocli.modeling import quiet_transformers
    quiet_transformers()
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


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


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer_state: dict, scheduler,
                    trainer_state: dict, model_state: dict | None = None) -> Path:
    """Write checkpoint-<step> atomically; returns its path."""
    final = run_dir / f"checkpoint-{step}"
    for stale in run_dir.glob(f"checkpoint-{step}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(final) as tmp:
        save_model_folder(tmp, model, tokenizer, model_state)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, tmp / STATE_PT)
        atomic_write_json(tmp / STATE_JSON, trainer_state)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are skipped)."""
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_JSON).exists() and (p / STATE_PT).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_trainer_state(folder: Path) -> tuple[dict, dict]:
    """(trainer_state.json contents, optimizer/scheduler/RNG states) of a checkpoint."""
    try:
        state = json.loads((folder / STATE_JSON).read_text())
        # weights_only=True: a checkpoint is data, never code. RNG states are plain tensors/tuples.
        tensors = torch.load(folder / STATE_PT, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DpocliError(f"is not a readable checkpoint ({type(err).__name__}: {err})",
                          file=folder, hint="delete it to resume from the one before") from None
    return state, tensors


def prune_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Delete the oldest checkpoints beyond `keep` (None keeps all)."""
    if not keep:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
