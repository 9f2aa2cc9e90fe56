"""Every `dpo` option, declared once: groups of flags as frozen dataclasses, and the helper that
turns a command's groups into typer parameters.

A field is one flag. Its help text (and its flag spelling, where that differs from the field
name) lives in the field's metadata; its default is the field's default. Field names are the
names of the library's config fields (`TrainConfig`, `PrecomputeConfig`, `run_eval`,
`run_verify`), so a command builds its config with `config_kwargs(*groups)` and no renaming.

Invariants (checked by tests/test_options.py):
* a command that takes a group offers every field of it, with the group's help and default, so
  a flag shared by two commands cannot drift between them;
* a flag name belongs to one field, except the few in `PER_COMMAND` whose meaning (and default)
  is the command's own, such as `--model` (the reference for precompute-ref, the policy for train);
* a group checks its own values in `__post_init__`; a bad value is a `DpocliError` (exit 2)
  raised before the command does any work. `TrainConfig.check` still holds train's older checks.

This module imports no torch, so `dpo --help` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpocli.errors import DpocliError

# modeling.DTYPES' names, spelled out so that `dpo --help` need not import torch (a test compares them).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
REQUIRED = dataclasses.MISSING  # a flag without a default must be given


def composed_fields(*groups: type, without: tuple[str, ...] = ()) -> list[tuple]:
    """Every field of the groups as `dataclasses.make_dataclass` takes them, with each group's own
    type and default, so a config built from them declares no option a second time. Fields without
    a default (a flag that must be given) come first, as a dataclass needs."""
    fields = [(f.name, f.type, field(default=f.default)) for g in groups for f in dataclasses.fields(g)
              if f.name not in without]
    names = [f[0] for f in fields]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"an option is in two groups of one config: {sorted(duplicates)}"
    required = [(n, t) for n, t, f in fields if f.default is REQUIRED]
    return required + [f for f in fields if f[2].default is not REQUIRED]


def group_of(config: Any, cls: type) -> Any:
    """The option group `cls` of a config composed from it (`make_optimizer(model, group_of(cfg,
    OptimOpts))`): a helper takes the group it needs, not the whole config."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def opt(default: Any, help: str, *, flags: tuple[str, ...] = (), negate: bool = False) -> Any:
    """A group field: its default, then its help. `flags`: the spellings when they differ from
    `--field-name`. `negate`: the flag turns the field off (`--no-shuffle` sets `shuffle` to
    False), so the flag's default is `not default`."""
    return field(default=default, metadata={"help": help, "flags": flags, "negate": negate})


WEIGHTS_FINGERPRINT_MODES = ("auto", "full", "sampled")  # modeling.weights_fingerprint


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise DpocliError(f"'{dtype}' is not one of {', '.join(DTYPE_NAMES)}", field="--dtype")


# The batch layouts' names (dpocli/model/layouts.py chooses which runs): name -> (packing,
# prefix_sharing). Here, so that `dpo --help` and the groups' checks need no torch.
LAYOUT_AUTO = "auto"
LAYOUT_FLAGS = {"padded": (False, False), "packed": (True, False), "shared": (False, True),
                "packed-shared": (True, True)}
LAYOUTS = (LAYOUT_AUTO, *LAYOUT_FLAGS)


def layout_name(packing: bool, prefix_sharing: bool) -> str:
    """The layout's name from the two flags."""
    return next(n for n, f in LAYOUT_FLAGS.items() if f == (bool(packing), bool(prefix_sharing)))


def check_layout(layout: str, packing: bool, prefix_sharing: bool) -> None:
    """A known name, and not given together with the older flags (which would be two answers)."""
    if layout not in LAYOUTS:
        raise DpocliError(f"'{layout}' is not one of {', '.join(LAYOUTS)}", field="--layout")
    if layout != LAYOUT_AUTO and (packing or prefix_sharing):
        flags = " ".join(f for f, on in (("--packing", packing), ("--prefix-sharing", prefix_sharing)) if on)
        raise DpocliError(f"cannot be combined with {flags}", field="--layout",
                          hint=f"give either --layout {layout} or {flags}")


# ---------------------------------------------------------------- groups shared by several commands


@dataclass(frozen=True)
class LoadOpts:
    """Where and how a model is loaded (precompute-ref, train, eval, cache verify)."""

    device: str | None = opt(None, "cpu, cuda or cuda:N (default: cuda if available).")
    trust_remote_code: bool = opt(False, "Allow model code from the model's repository.")
    model_revision: str | None = opt(
        None,
        "Commit, branch or tag of a Hub model id given as --model (TRL's model_revision; default main); "
        "refused for a local folder.",
    )


@dataclass(frozen=True)
class ModelOpts:
    """The numerics of the model a command runs (precompute-ref, train). eval's `--dtype` and
    `--attn-implementation` default to the cache's instead: see `EvalOpts`."""

    dtype: str = opt("float32", "Weights dtype: float32, bfloat16 or float16.")
    attn_implementation: str | None = opt(
        None, "eager, sdpa or flash_attention_2 (default: transformers' choice)."
    )
    compile: bool = opt(
        False, "torch.compile the transformer body (pays on long runs; compiling takes a minute)."
    )

    def __post_init__(self):
        check_dtype(self.dtype)


@dataclass(frozen=True)
class LayoutOpts:
    """How pairs are laid out in a forward pass (precompute-ref, train). The LM head's chunk size
    is not a flag: eval replays precompute's batching exactly, with the default chunking.
    `layout` names the four layouts; --packing / --prefix-sharing are the older spellings
    (dpocli/model/layouts.py chooses what runs)."""

    layout: str = opt(
        "auto",
        "auto, padded, packed, shared or packed-shared. auto: the fastest layout measured exact on the "
        "device (packed-shared on CPU, padded on CUDA; padded with --compile, torchrun, a non-sdpa "
        "--attn-implementation, MoE and vision-language models, and models packing does not support); "
        "on resume, the layout the run or cache started with. All layouts give the same numbers to rounding.",
    )
    prefix_sharing: bool = opt(
        False,
        "Run each pair's prompt once: prompt+chosen+rejected with a prefix-sharing attention pattern "
        "(faster with long prompts; without --packing it builds a dense mask and cannot use flash "
        "attention). Same as --layout shared, or packed-shared with --packing.",
    )
    packing: bool = opt(
        False,
        "Padding-free batches: all sequences of a batch end to end in one row, attention "
        "run per sequence (no compute on pad tokens). Same as --layout packed.",
    )

    def __post_init__(self):
        check_layout(self.layout, self.packing, self.prefix_sharing)


@dataclass(frozen=True)
class OutputOpts:
    """What to do with an existing output (precompute-ref, train)."""

    overwrite: bool = opt(
        False,
        "Replace a dpocli cache or run already in --out (a folder holding anything else is still refused).",
    )


@dataclass(frozen=True)
class LossOpts:
    """The loss (train, eval); names and defaults are TRL 1.16's. `losses.LossSpec` is built from
    these fields, and a run's run_config.json keeps one key per field.
    eval computes its loss as training did (TRL evaluates with the training loss config), so WPO,
    LD-DPO and the MoE router loss are loss options too."""

    beta: float = opt(0.1, "β: strength of the pull towards the reference; scales rewards and loss.")
    loss: str = opt(
        "sigmoid",
        "Loss type(s), comma-separated: sigmoid, cdpo, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, "
        "sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft (TRL 1.16's "
        "loss_type; cdpo is dpocli's label-smoothed sigmoid).",
    )
    loss_weights: str | None = opt(None, "Comma-separated weight per loss type (default all 1).")
    label_smoothing: float = opt(
        0.0,
        "ε for cdpo, robust, exo_pair (needs > 0), aot, aot_unpaired; refused when no listed loss uses "
        "it (TRL 1.16 ignores it there).",
    )
    ipo_length_normalized: bool = opt(
        True,
        "IPO on summed log-ratios (paper, OpenRLHF) instead of TRL's per-token average.",
        flags=("--ipo-sum",),
        negate=True,
    )
    discopop_tau: float = opt(0.05, "τ of the discopop loss.")
    f_divergence: str = opt(
        "reverse_kl",
        "reverse_kl (DPO), forward_kl, js_divergence or alpha_divergence (TRL's f_divergence_type); only "
        "with sigmoid, cdpo, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft.",
    )
    f_alpha: float = opt(0.5, "α of alpha_divergence (TRL's f_alpha_divergence_coef).")
    rpo_alpha: float | None = opt(
        None,
        "RPO (TRL's rpo_alpha): the same as --loss sigmoid,sft --loss-weights 1,A, i.e. DPO plus A "
        "times the token-mean NLL of the chosen completions.",
    )
    use_weighting: bool = opt(
        False,
        "WPO: weight each pair's loss by the policy's per-token-normalised probability of chosen times "
        "rejected (TRL's use_weighting; not with aot, aot_unpaired).",
    )
    ld_alpha: float | None = opt(
        None,
        "LD-DPO α in [0, 1]: completion tokens past the shorter completion of the pair count α times, for "
        "policy and reference (TRL's ld_alpha); needs a cache made with --token-logps.",
    )
    router_aux_loss_coef: float | None = opt(
        None,
        "MoE models: weight of the router load-balancing loss added to the loss and logged as aux_loss "
        "(default: the model config's router_aux_loss_coef, as TRL; 0 disables; refused for other models).",
    )


@dataclass(frozen=True)
class OutputFormat:
    """How the result is shown (every command)."""

    json: bool = opt(False, "Print the result as one JSON object on stdout.")
    quiet: bool = opt(False, "No progress or logs on stderr (errors still shown).", flags=("--quiet", "-q"))


# ---------------------------------------------------------------- groups of one command


@dataclass(frozen=True)
class PrecomputeOpts:
    model: str = opt(REQUIRED, "Reference model: a local folder or a hub id in the local HF cache.")
    out: Path = opt(REQUIRED, "Cache folder to write (created; resumed if unfinished).")
    max_length: int = opt(
        1024,
        "Max tokens of prompt+completion; longer completions are cut at the end (keep_start), rows whose "
        "prompt alone fills it are dropped.",
    )
    batch_size: int | None = opt(None, "Pairs per forward pass (length-sorted).")
    max_tokens: int | None = opt(
        None, "Padded tokens per forward pass, both rows of each pair counted (default 16384)."
    )
    id_column: str | None = opt(None, "Column with row ids (default: 'id' if present, else a content hash).")
    prompt_column: str = opt(
        "prompt", "Prompt column; if absent the prompt is the common prefix of chosen and rejected."
    )
    chosen_column: str = opt("chosen", "Preferred completion column.")
    rejected_column: str = opt("rejected", "Dispreferred completion column.")
    split: str = opt(
        "train",
        "Split to read from a folder laid out like a Hub dataset (split-named files, README.md configs, "
        "save_to_disk DatasetDict); splits are never merged.",
    )
    revision: str | None = opt(
        None,
        "Commit, branch or tag of a Hub dataset id given as INPUT (default main); refused for a local path.",
    )
    subset: str | None = opt(
        None,
        "Config of a dataset whose README.md lists several (its config_name; TRL's dataset_config; "
        "default: the README's default config).",
    )
    token_logps: bool = opt(False, "Also store per-token reference log-probs.")
    rows_per_shard: int = opt(4096, "Input rows per Parquet shard (the unit of resume).")
    drop_identical: bool = opt(False, "Drop rows whose chosen equals rejected (default: keep and warn).")
    strict: bool = opt(
        False, "Fail (exit 2) instead of skipping a row: a prompt that fills --max-length, or a row "
        "the chat template cannot render as the data means (README, Chat data).",
    )
    max_field_bytes: int = opt(
        4 * 2**20,
        "Largest prompt/chosen/rejected field in bytes of UTF-8 text; a larger one is refused (exit 2, "
        "naming file:row) before it reaches the tokenizer, whose memory grows with the text.",
    )
    fsdp: bool = opt(
        False,
        "Under torchrun, shard the reference over the ranks with FSDP2 (forward-only), for a model too "
        "large for one device.",
    )
    weights_fingerprint: str = opt(
        "auto",
        "How the reference weights are hashed into the cache: full (every byte), sampled (safetensors "
        "headers, sizes and 64 blocks per file; for very large models), auto (full up to 16 GiB of weights).",
    )

    def __post_init__(self):
        if self.weights_fingerprint not in WEIGHTS_FINGERPRINT_MODES:
            raise DpocliError(
                f"'{self.weights_fingerprint}' is not one of {', '.join(WEIGHTS_FINGERPRINT_MODES)}",
                field="--weights-fingerprint",
            )


@dataclass(frozen=True)
class OptimOpts:
    """The optimizer, schedule and batch size of train. AdamW's names follow TRL (adam_beta1, ...)."""

    lr: float = opt(1e-6, "Peak learning rate (TRL's default 1e-6).")
    epochs: int = opt(1, "Passes over the cache (ignored when --max-steps is given).")
    max_steps: int | None = opt(None, "Optimizer steps to run; overrides --epochs.")
    batch_size: int = opt(8, "Pairs per micro-batch per process.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    warmup_ratio: float = opt(0.0, "Warm-up as a fraction of all steps (if --warmup-steps is 0).")
    scheduler: str = opt(
        "linear",
        "transformers' lr_scheduler_type: linear, cosine, cosine_with_min_lr, constant (no warm-up), "
        "constant_with_warmup, inverse_sqrt or warmup_stable_decay.",
    )
    min_lr_rate: float | None = opt(
        None,
        "Floor of the rate as a fraction of --lr: needed by cosine_with_min_lr (min_lr_rate); for "
        "warmup_stable_decay the warm-up starts and the decay ends there (min_lr_ratio, default 0).",
    )
    num_decay_steps: int | None = opt(None, "warmup_stable_decay: steps of the final decay.")
    decay_ratio: float | None = opt(None, "warmup_stable_decay: the decay as a fraction of all steps.")
    decay_type: str | None = opt(None, "warmup_stable_decay: linear, cosine (default) or 1-sqrt decay.")
    optim: str = opt(
        "adamw",
        "HF's optim: adamw (torch), adamw_8bit or paged_adamw_8bit (bitsandbytes: pip install "
        "'dpocli\\[bnb]'), or adafactor (HF Trainer's: lr and weight decay only).",
    )
    weight_decay: float = opt(0.0, "AdamW weight decay (not on biases and norms).")
    adam_beta1: float = opt(0.9, "AdamW β1: decay of the gradient's running mean.")
    adam_beta2: float = opt(0.999, "AdamW β2: decay of the squared gradient's running mean.")
    adam_eps: float = opt(1e-8, "AdamW ε, added to the denominator for stability.", flags=("--adam-epsilon",))
    max_grad_norm: float = opt(1.0, "Clip the total gradient norm (0 disables).")
    seed: int = opt(42, "Seed for batch order and any randomness.")

    def __post_init__(self):
        # torch.optim.AdamW would refuse these with a ValueError at the first step (exit 1).
        for flag, value in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0 <= value < 1:
                raise DpocliError(f"must be in [0, 1), got {value}", field=flag)
        if not self.adam_eps >= 0:
            raise DpocliError(f"must be >= 0, got {self.adam_eps}", field="--adam-epsilon")


@dataclass(frozen=True)
class TrainOpts:
    model: str = opt(REQUIRED, "Policy to start from (usually the reference model itself).")
    out: Path = opt(REQUIRED, "Run folder: checkpoints, metrics.jsonl, final model.")
    autocast: str | None = opt(None, "Mixed precision over fp32 weights: bfloat16 or float16.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    fsdp: bool = opt(False, "Under torchrun, shard the policy with FSDP2 (per decoder layer) instead of DDP.")
    keep_dropout: bool = opt(
        False,
        "Train with the model's dropout (default: every dropout set to 0, like TRL's disable_dropout; "
        "precompute-ref and eval run the model in eval mode, never with dropout).",
    )
    shuffle: bool = opt(True, "Batches in the input file's row order.", flags=("--no-shuffle",), negate=True)
    group_by_length: bool = opt(False, "Batch pairs of similar length (less padding, random batch order).")
    eval_cache: Path | None = opt(None, "Held-out cache for eval_* metrics.")
    eval_every: int | None = opt(None, "Evaluate every N steps (and at the end).")
    report_to: str | None = opt(
        None,
        "Also log to tensorboard, wandb and/or mlflow (comma-separated; the package must be installed), "
        "under HF Trainer's keys (train/loss, eval/loss, ...).",
    )
    skip_step0_check: bool = opt(False, "Do not stop when policy = reference fails to reproduce the cache.")
    allow_tokenizer_mismatch: bool = opt(
        False, "Train although the policy's tokenizer differs from the cache's."
    )


@dataclass(frozen=True)
class CheckpointOpts:
    save_every: int | None = opt(None, "Checkpoint every N steps (always at the end).")
    save_total_limit: int | None = opt(None, "Keep only the newest N checkpoints.")
    resume: bool = opt(False, "Continue from the newest checkpoint in --out.")


@dataclass(frozen=True)
class LoraOpts:
    lora_r: int | None = opt(
        None,
        "Train a LoRA adapter of this rank instead of all weights (needs the optional peft package: "
        "pip install 'dpocli\\[lora]').",
    )
    lora_alpha: float = opt(16.0, "LoRA scaling α.")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA path.")
    lora_target_modules: str | None = opt(
        None,
        "Modules to adapt: comma-separated names or 'all-linear' (default: peft's choice for the "
        "architecture, q_proj,v_proj for Llama).",
    )
    use_dora: bool = opt(False, "DoRA: weight-decomposed LoRA (peft's use_dora).")
    use_rslora: bool = opt(False, "rsLoRA: scale the adapter by α/√r instead of α/r (peft's use_rslora).")
    lora_modules_to_save: str | None = opt(
        None,
        "Modules trained in full and saved with the adapter, comma-separated (peft's modules_to_save, "
        "e.g. lm_head).",
    )
    merge: bool = opt(False, "With LoRA, also save base + adapter merged to RUN_DIR/merged.")


@dataclass(frozen=True)
class QuantOpts:
    """Quantized base weights through bitsandbytes (train: QLoRA, with --lora-r; eval). TRL's
    ModelConfig names and defaults."""

    load_in_4bit: bool = opt(
        False,
        "Load the base model's linear layers in 4 bits (QLoRA; train needs --lora-r; needs bitsandbytes: "
        "pip install 'dpocli\\[qlora]').",
    )
    load_in_8bit: bool = opt(
        False, "Load the base model's linear layers in 8 bits (LLM.int8; otherwise as --load-in-4bit)."
    )
    bnb_4bit_quant_type: str = opt("nf4", "4-bit data type: nf4 (QLoRA's NormalFloat) or fp4.")
    use_bnb_nested_quant: bool = opt(
        False,
        "4-bit: also quantize the per-block scales (bitsandbytes' double quant; ~0.37 bit per weight less).",
    )


@dataclass(frozen=True)
class ReportOpts:
    out: Path | None = opt(
        None,
        "Also draw the curves to a .png, or a self-contained .html page (needs "
        "matplotlib, the 'report' extra).",
    )


# Flags whose meaning and default are each command's own, so each is declared in that command's
# group: which model (reference, policy, several to score), which output, what a batch or a seed is
# for; eval's numerics default to the cache's.
PER_COMMAND = {
    "--model",
    "--out",
    "--batch-size",
    "--max-tokens",
    "--seed",
    "--dtype",
    "--attn-implementation",
    "--fsdp",  # shards the reference (precompute-ref), the policy (train) or the scored models (eval)
    "--drop-identical",  # raw text on reading (precompute-ref), ids after truncation (cache filter)
}
