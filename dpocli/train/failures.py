"""The errors a run ends with that name where to go next (the last good checkpoint, the command)."""

from __future__ import annotations

from pathlib import Path

from dpocli.errors import RunFailure


def non_finite(cfg, run_dir: Path, state, what: str) -> RunFailure:
    """A loss or gradient norm that became NaN/inf: the run stops, the last good checkpoint stays."""
    good = run_dir / f"checkpoint-{state.last_saved}" if state.last_saved else cfg.model
    return RunFailure(
        f"non-finite {what} at step {state.step + 1}; the last good checkpoint is "
        f"{good if state.last_saved else 'none'}",
        hint=f"start a new run from {good} with a lower --lr (or --dtype float32): dpo train "
             f"{cfg.cache} --model {good} --out NEW_DIR ... (--resume keeps the original settings)")
