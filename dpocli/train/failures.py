"""The errors a run ends with that name where to go next (the last good checkpoint, the command)."""

from __future__ import annotations

from pathlib import Path

from dpocli.errors import Interrupted, RunFailure, out_of_memory_types


def non_finite(cfg, run_dir: Path, state, what: str) -> RunFailure:
    """A loss or gradient norm that became NaN/inf: the run stops, the last good checkpoint stays."""
    good = run_dir / f"checkpoint-{state.last_saved}" if state.last_saved else cfg.model
    return RunFailure(
        f"non-finite {what} at step {state.step + 1}; the last good checkpoint is "
        f"{good if state.last_saved else 'none'}",
        hint=f"start a new run from {good} with a lower --lr (or --dtype float32): dpo train "
             f"{cfg.cache} --model {good} --out NEW_DIR ... (--resume keeps the original settings)")


def as_run_failure(s, state, err: BaseException, save) -> BaseException:
    """Out of memory and Ctrl-C / SIGTERM as one-line errors; an interrupted run saves first.
    Partial gradients of an unfinished step are discarded: the checkpoint is the last completed
    step, and the run resumes from exactly there. `s`: the loop's session; `save()` checkpoints."""
    if isinstance(err, out_of_memory_types()):
        return RunFailure(f"out of memory at step {state.step + 1} (batch of {s.cfg.batch_size} pairs "
                          "per rank)", hint="lower --batch-size and raise --grad-accum, add "
                                            "--gradient-checkpointing, or use --autocast bfloat16")
    if isinstance(err, KeyboardInterrupt):
        s.optimizer.zero_grad(set_to_none=True)
        if state.step > 0:
            save()
        where = f"checkpoint-{state.last_saved}" if state.last_saved else "no checkpoint (step 0)"
        return Interrupted(f"interrupted at step {state.step}; saved {where}",
                           hint=f"resume with the same command plus --resume (out: {s.run_dir})")
    return err
