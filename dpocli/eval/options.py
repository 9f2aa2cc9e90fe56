"""The options of `dpo eval` and `dpo cache verify`, declared once as option groups like every other
command's (dpocli/options.py has the shared groups and helpers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpocli.errors import DpocliError
from dpocli.options import check_dtype, opt


@dataclass(frozen=True)
class EvalOpts:
    model: list[str] | None = opt(
        None, "Model folder to score (repeatable; quoted globs like 'run/checkpoint-*' expand in step order)."
    )
    max_tokens: int | None = opt(
        None,
        "Padded tokens per forward (default: the cache's precompute batching, which reproduces it exactly).",
    )
    # None = the cache's: scoring the reference in other numerics is not exactly neutral.
    dtype: str | None = opt(
        None, "Weights dtype: float32, bfloat16 or float16 (default: the cache's; another value warns)."
    )
    attn_implementation: str | None = opt(
        None, "eager, sdpa or flash_attention_2 (default: the cache's; another value warns)."
    )
    per_example: Path | None = opt(None, "Write one row per (model, pair) to this .parquet or .jsonl file.")
    samples: int = opt(0, "Generate completions for the first N held-out prompts.")
    ref_model: str | None = opt(
        None, "Reference model for side-by-side samples and a sampled KL(policy||reference) estimate."
    )
    max_new_tokens: int = opt(64, "Generation length for --samples.")
    temperature: float = opt(0.0, "0 = greedy samples; KL always samples at 1.")
    kl_samples: int = opt(4, "Policy samples per prompt for the KL estimate.")
    seed: int = opt(0, "Seed for sampling.")
    fsdp: bool = opt(
        False,
        "Under torchrun, shard each model over the ranks with FSDP2 (forward-only; each rank loads only "
        "its part), for a model too large for one device.",
    )

    def __post_init__(self):
        check_dtype(self.dtype)
        if self.fsdp and self.samples:
            raise DpocliError("cannot be combined with --fsdp (generation runs on one device)",
                              field="--samples")


@dataclass(frozen=True)
class VerifyOpts:
    rescore: int = opt(0, "Re-score N random rows with the reference model and compare.")
    model: str | None = opt(
        None,
        "Reference model to re-score with (default: the path in the manifest; its "
        "weights must match the manifest's sha256).",
    )
    seed: int = opt(0, "Seed for choosing the rows to re-score.")
