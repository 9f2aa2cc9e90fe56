"""HF Trainer's end-of-run metrics (`train()`'s output), under its names: train_runtime,
train_samples_per_second, train_steps_per_second and train_loss.

Definitions, as transformers' Trainer computes them (`_finalize_training`, `speed_metrics`):

    train_loss                 mean of the per-step losses of the steps run by THIS process (a resumed
                               run averages only the steps after its checkpoint, as HF does)
    train_runtime              seconds from the end of set-up to the end of the last step (periodic
                               eval and checkpoints included; the final eval and model save are not)
    train_samples_per_second   pairs scheduled for the whole run x (steps run / total steps) / runtime,
                               pairs scheduled = pairs in the cache x epochs, or max_steps x global batch
    train_steps_per_second     steps run / runtime

Rounding is HF's: 4 decimals for the runtime, 3 for the rates.
"""

from __future__ import annotations

import resource
import time

from dpocli import __version__
from dpocli.model.attention import describe as describe_attention


class TrainTotals:
    """A metrics sink that keeps the per-step losses this process logs and when the last step ended.

    It sits beside the dashboard sinks, so it sees exactly the records metrics.jsonl receives (on
    rank 0; other ranks log nothing and their totals stay empty)."""

    def __init__(self, t_start: float | None = None):
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.t_last = self.t_start
        self.loss_sum = 0.0
        self.steps = 0

    def write(self, record: dict) -> None:
        if "loss" in record:  # a training step's record (eval records have eval_loss)
            self.loss_sum += record["loss"]
            self.steps += 1
            self.t_last = time.perf_counter()

    def close(self) -> None:
        pass

    def summary(self, samples_scheduled: int, total_steps: int) -> dict:
        runtime = self.t_last - self.t_start
        out = {"train_runtime": round(runtime, 4)}
        if runtime > 0:
            samples = samples_scheduled * self.steps / max(total_steps, 1)
            out["train_samples_per_second"] = round(samples / runtime, 3)
            out["train_steps_per_second"] = round(self.steps / runtime, 3)
        # HF divides by max(steps, 0.001) and reports 0.0 for a run with nothing left to do;
        # None says so instead of posing as a loss.
        out["train_loss"] = self.loss_sum / self.steps if self.steps else None
        return out


def samples_scheduled(cfg, num_rows: int, global_batch: int) -> int:
    """HF's num_train_samples: pairs x epochs, or max_steps x pairs per step when max_steps is set
    (`global_batch`: pairs per micro-batch over all ranks)."""
    return cfg.max_steps * global_batch * cfg.grad_accum if cfg.max_steps else num_rows * cfg.epochs


def log_and_close(s, state) -> dict:
    """HF's end-of-run metrics, logged as HF's train() logs them before it returns: as metrics.jsonl's
    last line and to every dashboard sink (TensorBoard `train/train_runtime`, ..., at the last step;
    W&B its run summary; MLflow the names as they are), which are then closed. Returns them.
    `s` is train's session, `state` its TrainState."""
    hf = s.totals.summary(samples_scheduled(s.cfg, s.data.num_rows, s.global_batch), s.total_steps)
    s.metrics_log.write({"step": state.step, **hf})
    s.metrics_log.close()
    return hf


def train_summary(s, state, final_eval: dict, t_start: float, hf: dict) -> dict:
    """`dpo train --json`: what ran, HF's end-of-run metrics `hf` (`log_and_close`), the step-0
    check, the final eval and peak memory."""
    import torch

    # The largest per-rank peak: what each host must provide per process (a collective).
    rss_kb = s.dist.max_over_ranks(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    peak = {"peak_rss_mb": round(rss_kb / 1024, 1)}
    if s.device.type == "cuda":
        peak["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(s.device) / 2**20, 1)
    return {"command": "train", "dpocli_version": __version__, "run_dir": str(s.run_dir),
            "model_dir": str(s.run_dir), "steps": state.step, "total_steps": s.total_steps,
            "seconds": round(time.perf_counter() - t_start, 3), **state.step0, **hf,
            "attention_kernel": describe_attention(s.cfg.packing, s.cfg.attn_implementation),
            "last_train_metrics": s.metrics_log.last_record_with("loss"), "eval": final_eval, **peak}
