"""What `dpo train` takes: the options of a run, checked once before anything is loaded or written."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpocli import layouts
from dpocli.errors import DpocliError, check_at_least, check_seed, check_torchrun_launch
from dpocli.losses import LOSS_OPTIONS, LossSpec, spec_from_options
from dpocli.packing import check_layout_flags


@dataclass(frozen=True)
class TrainConfig:
    cache: str
    model: str
    out: str
    beta: float = 0.1
    loss: str = "sigmoid"
    loss_weights: str | None = None
    label_smoothing: float = 0.0
    ipo_length_normalized: bool = True
    discopop_tau: float = 0.05
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5  # TRL's f_alpha_divergence_coef default
    rpo_alpha: float | None = None  # alias: --loss sigmoid,sft --loss-weights 1,A
    use_weighting: bool = False  # WPO (TRL's use_weighting)
    ld_alpha: float | None = None  # LD-DPO (TRL's ld_alpha); needs a --token-logps cache
    router_aux_loss_coef: float | None = None  # MoE; None = the model config's value (as TRL)
    lr: float = 1e-6  # TRL's default
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    scheduler: str = "linear"
    min_lr_rate: float | None = None  # cosine_with_min_lr / warmup_stable_decay floor
    num_decay_steps: int | None = None  # warmup_stable_decay
    decay_ratio: float | None = None  # warmup_stable_decay
    decay_type: str | None = None  # warmup_stable_decay; None = transformers' cosine
    optim: str = "adamw"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "float32"
    autocast: str | None = None  # bfloat16 / float16 mixed precision over fp32 weights
    device: str | None = None
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 sharding under torchrun (default there: DDP)
    lora_r: int | None = None  # LoRA rank; None = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str | None = None  # None = peft's default for the architecture
    use_dora: bool = False
    use_rslora: bool = False
    lora_modules_to_save: str | None = None
    merge: bool = False  # with LoRA: also save base+adapter merged to RUN_DIR/merged
    load_in_4bit: bool = False  # QLoRA: base in 4 bits (bitsandbytes), needs lora_r
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"  # TRL's ModelConfig default
    use_bnb_nested_quant: bool = False  # TRL's ModelConfig default
    compile: bool = False  # torch.compile the transformer body
    layout: str = "auto"  # layouts.LAYOUTS; run_train replaces auto with the layout that runs
    prefix_sharing: bool = False  # one row per pair: prompt + chosen + rejected, prompt run once
    packing: bool = False  # padding-free: all sequences of a micro-batch in one row
    report_to: str | None = None  # tensorboard, wandb, mlflow (comma-separated), beside metrics.jsonl
    shuffle: bool = True
    group_by_length: bool = False
    save_every: int | None = None
    save_total_limit: int | None = None
    eval_cache: str | None = None
    eval_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    skip_step0_check: bool = False
    keep_dropout: bool = False  # TRL's disable_dropout=True is the default
    allow_tokenizer_mismatch: bool = False
    trust_remote_code: bool = False
    model_revision: str | None = None  # of a Hub model id given as `model` (see hub.py)
    chunk_size: int = 1024

    def loss_spec(self) -> LossSpec:
        return spec_from_options(**{name: getattr(self, name) for name in LOSS_OPTIONS})

    def total_steps(self, num_rows: int, world_size: int = 1) -> int:
        """Optimizer steps of the run: --max-steps, else --epochs passes over `num_rows` pairs in
        micro-batches of batch_size x world_size pairs, grad_accum of them a step (a short last one
        included)."""
        micro_batches = math.ceil(num_rows / (self.batch_size * world_size))
        return self.max_steps or self.epochs * math.ceil(micro_batches / self.grad_accum)

    def check_steps(self, num_rows: int, world_size: int = 1) -> None:
        """The checks that need the run's length: called once the cache's row count is known, before
        the model is loaded or the run folder created."""
        from dpocli import schedule
        schedule.schedule_of(self, self.total_steps(num_rows, world_size))  # refuses a WSD that does not fit

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
        from dpocli import schedule
        schedule.check(self)
        if self.max_steps:  # the run's length is known without the cache
            self.check_steps(0)
        if not 0 <= self.warmup_ratio < 1:
            raise DpocliError(f"must be in [0, 1), got {self.warmup_ratio}", field="--warmup-ratio")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise DpocliError(f"'{self.autocast}' is not bfloat16 or float16", field="--autocast")
        check_torchrun_launch(self.fsdp, "train")
        from dpocli.integrations import check as check_report_to
        check_report_to(self.report_to)
        layouts.check(self.layout, self.packing, self.prefix_sharing)
        check_layout_flags(self.prefix_sharing, self.packing, self.attn_implementation)
        from dpocli.quantization import check_train as check_quantization
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
