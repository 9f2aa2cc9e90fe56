"""Optimizer and learning-rate schedule, as HF Trainer builds them from TRL's arguments.

Invariants:
* `--optim` and `--scheduler` take HF's names (`optim`, `lr_scheduler_type`), and each schedule's
  multiplier equals transformers' `get_scheduler(name, ...)` LambdaLR step by step
  (tests/test_schedule.py compares them over whole runs);
* a flag that the chosen optimizer or schedule would ignore is refused by `check` (exit 2), since
  HF would train without it silently.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch

from dpocli.errors import DpocliError
from dpocli.options import OptimOpts

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor")
SCHEDULERS = ("linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup",
              "inverse_sqrt", "warmup_stable_decay")
DECAY_TYPES = ("linear", "cosine", "1-sqrt")  # transformers' get_wsd_schedule decay_type
ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8}  # TrainConfig's defaults


def check(cfg: OptimOpts) -> None:
    """Refuse unknown names, missing packages and flags the chosen optimizer or schedule ignores."""
    if cfg.optim not in OPTIMIZERS:
        raise DpocliError(f"'{cfg.optim}' is not one of {', '.join(OPTIMIZERS)}", field="--optim")
    if cfg.optim.endswith("8bit"):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise DpocliError(f"'{cfg.optim}' needs the bitsandbytes package", field="--optim",
                              hint="pip install 'dpocli[bnb]', or use --optim adamw")
    if cfg.optim == "adafactor":
        changed = [k for k, v in ADAM_DEFAULTS.items() if getattr(cfg, k) != v]
        if changed:  # HF's adafactor takes only lr and weight decay
            flag = "--adam-epsilon" if changed[0] == "adam_eps" else "--" + changed[0].replace("_", "-")
            raise DpocliError("has no effect with --optim adafactor", field=flag)
    if cfg.scheduler not in SCHEDULERS:
        raise DpocliError(f"'{cfg.scheduler}' is not one of {', '.join(SCHEDULERS)}", field="--scheduler")
    _check_schedule_flags(cfg)


def _check_schedule_flags(cfg: OptimOpts) -> None:
    kind = cfg.scheduler
    if kind == "constant" and (cfg.warmup_steps or cfg.warmup_ratio):
        # transformers' "constant" ignores warm-up; refusing beats training without it.
        raise DpocliError("has no warm-up (as in transformers)", field="--scheduler constant",
                          hint="use --scheduler constant_with_warmup")
    wsd = {"--num-decay-steps": cfg.num_decay_steps, "--decay-ratio": cfg.decay_ratio,
           "--decay-type": cfg.decay_type}
    for flag, value in wsd.items():
        if value is not None and kind != "warmup_stable_decay":
            raise DpocliError("only applies to --scheduler warmup_stable_decay", field=flag)
    if cfg.min_lr_rate is not None and kind not in ("cosine_with_min_lr", "warmup_stable_decay"):
        raise DpocliError("only applies to --scheduler cosine_with_min_lr or warmup_stable_decay",
                          field="--min-lr-rate")
    if cfg.min_lr_rate is not None and not 0 <= cfg.min_lr_rate <= 1:
        raise DpocliError(f"must be in [0, 1], got {cfg.min_lr_rate}", field="--min-lr-rate")
    if kind == "cosine_with_min_lr" and cfg.min_lr_rate is None:  # transformers raises too
        raise DpocliError("needs --min-lr-rate (the floor as a fraction of --lr)", field="--scheduler")
    if kind != "warmup_stable_decay":
        return
    if (cfg.num_decay_steps is None) == (cfg.decay_ratio is None):
        raise DpocliError("needs exactly one of --num-decay-steps and --decay-ratio",
                          field="--scheduler warmup_stable_decay")
    if cfg.num_decay_steps is not None and cfg.num_decay_steps < 1:
        raise DpocliError(f"must be >= 1, got {cfg.num_decay_steps}", field="--num-decay-steps")
    if cfg.decay_ratio is not None and not 0 < cfg.decay_ratio <= 1:
        raise DpocliError(f"must be in (0, 1], got {cfg.decay_ratio}", field="--decay-ratio")
    if cfg.decay_type is not None and cfg.decay_type not in DECAY_TYPES:
        raise DpocliError(f"'{cfg.decay_type}' is not one of {', '.join(DECAY_TYPES)}", field="--decay-type")


# ---------------------------------------------------------------- optimizers


def make_optimizer(model, cfg: OptimOpts, device) -> torch.optim.Optimizer:
    """HF Trainer's optimizer for `cfg.optim`; like HF, no weight decay on biases and norm weights
    (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim == "adafactor":
        from transformers.optimization import Adafactor
        # HF Trainer's optim="adafactor": an external lr schedule, so no relative step and no
        # parameter-scale multiplier; Adafactor's other defaults (eps, clip 1.0, decay -0.8, no β1).
        return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False)
    adam = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps}
    if cfg.optim.endswith("8bit"):
        import bitsandbytes
        # HF's adamw_bnb_8bit / paged_adamw_8bit: bitsandbytes' AdamW with 8-bit states.
        return bitsandbytes.optim.AdamW(groups, **adam, optim_bits=8, is_paged=cfg.optim.startswith("paged"))
    # Fused AdamW (TRL's default on GPU) is also ~4x faster than foreach on CPU (0.19 -> 0.04 s per
    # step for a 31M model, bench/profile_dpocli_step.py). It takes FSDP's DTensor parameters too
    # (torchtune's FSDP2 configs use it), and it matters there: foreach's `sqrt` of the second
    # moments is a temporary as large as this rank's whole shard.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, **adam, fused=fused or None)


# ---------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Schedule:
    """The learning-rate multiplier of a run. `warmup`, `decay` and `total` count optimizer steps;
    `floor` is min_lr_rate (cosine_with_min_lr) or min_lr_ratio (warmup_stable_decay)."""

    kind: str
    warmup: int
    total: int
    floor: float = 0.0
    decay: int = 0  # warmup_stable_decay: steps of the final decay
    decay_type: str = "cosine"

    def factor(self, step: int) -> float:
        """Multiplier of the peak rate at optimizer step `step` (0-based), as transformers defines it."""
        w = self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "warmup_stable_decay":
            return self._wsd(step)
        if step < w:  # linear warm-up from 0, shared by all other kinds
            return step / max(1, w)
        progress = (step - w) / max(1, self.total - w)
        if self.kind == "linear":
            return max(0.0, (self.total - step) / max(1, self.total - w))
        if self.kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if self.kind == "cosine_with_min_lr":
            return max(0.0, self.floor + (1 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
        if self.kind == "inverse_sqrt":
            timescale = w or 10_000  # transformers' default timescale
            return 1.0 / math.sqrt((step + timescale - w) / timescale)
        return 1.0  # constant_with_warmup

    def _wsd(self, step: int) -> float:
        """Warm-up from `floor`, stable at 1, decay to `floor` over the last `decay` steps, then `floor`."""
        w, stable = self.warmup, self.total - self.warmup - self.decay
        if step < w:
            return max(0.0, self.floor + (1 - self.floor) * step / max(1, w))
        if step < w + stable:
            return 1.0
        if step < w + stable + self.decay:
            p = (step - w - stable) / max(1, self.decay)
            shape = {"linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p)),
                     "1-sqrt": 1.0 - math.sqrt(p)}[self.decay_type]
            return max(0.0, self.floor + (1 - self.floor) * shape)
        return self.floor


def schedule_of(cfg: OptimOpts, total_steps: int) -> Schedule:
    """The run's schedule; ratios round up to whole steps, as HF's get_warmup_steps does.

    warmup_stable_decay needs warm-up + decay <= total steps (a stable phase of >= 0 steps), else
    exit 2. transformers' get_wsd_schedule accepts a negative stable phase silently: the warm-up
    runs in full, then the rate drops to the middle of the decay curve (its first warm-up + decay -
    total steps are skipped), or there is no decay at all when the warm-up fills the run."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    decay = 0
    if cfg.scheduler == "warmup_stable_decay":
        decay = cfg.num_decay_steps or math.ceil(cfg.decay_ratio * total_steps)
        if warmup + decay > total_steps:
            warmup_flag = "--warmup-steps" if cfg.warmup_steps else "--warmup-ratio"
            decay_flag = "--num-decay-steps" if cfg.num_decay_steps else "--decay-ratio"
            steps_flag = "--max-steps" if cfg.max_steps else f"--epochs {cfg.epochs} over the cache"
            what = f"decay ({decay} steps, {decay_flag}) takes"
            if warmup:
                what = f"warm-up ({warmup} steps, {warmup_flag}) plus {what[:-1]}"
            raise DpocliError(f"{what} more than the run's {total_steps} steps ({steps_flag}); "
                              "transformers would skip the start of the decay",
                              field="--scheduler warmup_stable_decay",
                              hint=f"lower {decay_flag}{' or ' + warmup_flag if warmup else ''}, "
                                   "or train for more steps")
    return Schedule(cfg.scheduler, warmup, total_steps, floor=cfg.min_lr_rate or 0.0, decay=decay,
                    decay_type=cfg.decay_type or "cosine")


def make_scheduler(optimizer, cfg: OptimOpts, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = schedule_of(cfg, total_steps)
    # A lambda, not the bound method: LambdaLR's state_dict skips plain functions and lambdas.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.factor(step))
