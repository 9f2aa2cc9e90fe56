"""What `dpo train` takes: the options of a run, checked once before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import math

from dpocli.errors import DpocliError, check_at_least, check_seed, check_torchrun_launch
from dpocli.model import distributed, layouts
from dpocli.model.devices import resolve_device
from dpocli.model.packing import check_layout_flags
from dpocli.model.quantization import check_train as check_quantization
from dpocli.objective.losses import LossSpec
from dpocli.objective.spec import spec_from_options
from dpocli.options import (
    CheckpointOpts,
    LayoutOpts,
    LoadOpts,
    LoraOpts,
    LossOpts,
    ModelOpts,
    OptimOpts,
    OutputOpts,
    QuantOpts,
    TrainOpts,
    check_layout,
    composed_fields,
    group_of,
)
from dpocli.train import schedule
from dpocli.train.dashboards import check as check_report_to

# `dpo train`'s option groups, in the order the command declares them.
TRAIN_GROUPS = (TrainOpts, LossOpts, OptimOpts, ModelOpts, LayoutOpts, LoadOpts, LoraOpts, QuantOpts,
                CheckpointOpts, OutputOpts)


class _TrainChecks:
    """The methods of `TrainConfig` (its fields come from the option groups, below)."""

    def with_layout(self, started: tuple[bool, bool] | None):
        """This config with the layout that runs in its layout fields (auto: by device and model;
        `started`: the (packing, prefix_sharing) of the run being resumed, which auto keeps)."""
        return layouts.apply(self, resolve_device(self.device).type, distributed.under_torchrun(),
                             layouts.model_config(self.model, self.model_revision), started)

    def loss_spec(self) -> LossSpec:
        return spec_from_options(group_of(self, LossOpts))

    def total_steps(self, num_rows: int, world_size: int = 1) -> int:
        """Optimizer steps of the run: --max-steps, else --epochs passes over `num_rows` pairs in
        micro-batches of batch_size x world_size pairs, grad_accum of them a step (a short last one
        included)."""
        micro_batches = math.ceil(num_rows / (self.batch_size * world_size))
        return self.max_steps or self.epochs * math.ceil(micro_batches / self.grad_accum)

    def check_steps(self, num_rows: int, world_size: int = 1) -> None:
        """The checks that need the run's length: called once the cache's row count is known, before
        the model is loaded or the run folder created."""
        # refuses a warmup_stable_decay that does not fit the run
        schedule.schedule_of(group_of(self, OptimOpts), self.total_steps(num_rows, world_size))

    def check(self) -> None:
        positive = {"--lr": self.lr, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--epochs": self.epochs}
        for flag, value in positive.items():
            if not value > 0:
                raise DpocliError(f"must be > 0, got {value}", field=flag)
        check_at_least({"--max-steps": self.max_steps, "--save-every": self.save_every,
                        "--eval-every": self.eval_every, "--save-total-limit": self.save_total_limit}, 1)
        # 0 has a meaning for these: no warm-up, no weight decay, no clipping (--max-grad-norm 0).
        check_at_least({"--warmup-steps": self.warmup_steps, "--weight-decay": self.weight_decay,
                        "--max-grad-norm": self.max_grad_norm}, 0)
        check_seed(self.seed)
        schedule.check(group_of(self, OptimOpts))
        if self.optim != "adamw" and self.fsdp:
            # bitsandbytes' states and Adafactor's row/column factors are per tensor: on FSDP shards
            # they would be computed per shard, not per weight, and the run would not match one process.
            raise DpocliError(f"'{self.optim}' is not supported together with --fsdp", field="--optim")
        if self.max_steps:  # the run's length is known without the cache
            self.check_steps(0)
        if not 0 <= self.warmup_ratio < 1:
            raise DpocliError(f"must be in [0, 1), got {self.warmup_ratio}", field="--warmup-ratio")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise DpocliError(f"'{self.autocast}' is not bfloat16 or float16", field="--autocast")
        check_torchrun_launch(self.fsdp, "train")
        check_report_to(self.report_to)
        check_layout(self.layout, self.packing, self.prefix_sharing)
        check_layout_flags(self.prefix_sharing, self.packing, self.attn_implementation)
        check_quantization(self)
        if self.compile and self.fsdp:
            raise DpocliError("is not supported together with --fsdp", field="--compile")
        if self.lora_r is not None and self.lora_r < 1:
            raise DpocliError(f"must be >= 1, got {self.lora_r}", field="--lora-r")
        if self.lora_dropout and not self.keep_dropout:
            # TRL's disable_dropout would zero it silently; a flag that does nothing is refused.
            raise DpocliError("has no effect: dropout is off in training unless --keep-dropout is given",
                              field="--lora-dropout", hint="add --keep-dropout, or drop --lora-dropout")
        lora_only = {"--use-dora": self.use_dora, "--use-rslora": self.use_rslora,
                     "--lora-modules-to-save": self.lora_modules_to_save}
        for flag, value in lora_only.items():
            if value and self.lora_r is None:
                raise DpocliError("only applies to LoRA runs", field=flag, hint="add --lora-r N")
        if self.merge and self.lora_r is None:
            raise DpocliError("only applies to LoRA runs", field="--merge", hint="add --lora-r N")
        if self.eval_every and not self.eval_cache:
            raise DpocliError("needs --eval-cache", field="--eval-every")


# What `dpo train` takes: the cache, then one field per flag of its option groups, flat (a run's
# run_config.json keeps one key per flag, so old runs still resume), each declared once, in its
# group (dpocli/options.py). `chunk_size` is the LM head's vocabulary chunk (no flag).
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [("cache", str), *composed_fields(*TRAIN_GROUPS), ("chunk_size", int, dataclasses.field(default=1024))],
    bases=(_TrainChecks,), frozen=True)
TrainConfig.__module__ = __name__
