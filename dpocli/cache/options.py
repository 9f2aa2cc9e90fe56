"""The options of `dpo cache audit|filter|split|merge` (the cache as a dataset), declared once as
option groups like every other command's (dpocli/options.py has the shared helpers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpocli.options import REQUIRED, opt


@dataclass(frozen=True)
class AuditOpts:
    tail_tokens: int = opt(
        4, "Count pairs whose completions differ only in their last N tokens (sharing at least N)."
    )
    top: int = opt(10, "List the N pairs the reference prefers most strongly the other way round.")
    out: Path | None = opt(
        None,
        "Also draw length and margin histograms to a .png, or a self-contained .html page (needs "
        "matplotlib, the 'report' extra).",
    )


@dataclass(frozen=True)
class FilterOpts:
    """`dpo cache filter`: the rows to drop (cache_select.FilterRule's fields) and where to write."""

    out: Path = opt(
        REQUIRED, "Folder of the new cache (never the input; --overwrite replaces only a dpocli cache)."
    )
    drop_identical: bool = opt(False, "Drop pairs whose chosen and rejected ids are equal after truncation.")
    drop_truncated: bool = opt(
        False, "Drop pairs where prompt + chosen or prompt + rejected reached max_length."
    )
    dedupe: bool = opt(False, "Keep one of each exact duplicate pair (same prompt, chosen and rejected ids).")
    drop_conflicting: bool = opt(
        False, "Drop pairs whose prompt appears elsewhere with chosen and rejected swapped (both sides)."
    )
    min_ref_margin: float | None = opt(
        None, "Drop pairs whose reference margin (ref chosen - ref rejected log-prob) is below X."
    )
    max_ref_margin: float | None = opt(None, "Drop pairs whose reference margin is above X.")
    per_token: bool = opt(
        False, "--min/--max-ref-margin compare the margin of mean log-probs per completion token."
    )
    max_total_tokens: int | None = opt(None, "Drop pairs whose prompt + longer completion exceeds N tokens.")
    ids: Path | None = opt(None, "Keep only the pairs whose id is listed in this file (one id per line).")
    exclude_ids: Path | None = opt(None, "Drop the pairs whose id is listed in this file (one id per line).")
    sample: int | None = opt(None, "Keep N pairs drawn at random from those the other options keep.")
    seed: int = opt(0, "Seed for --sample.")


@dataclass(frozen=True)
class SplitOpts:
    out_train: Path = opt(REQUIRED, "Folder of the train cache.")
    out_test: Path = opt(REQUIRED, "Folder of the test cache.")
    test_size: float = opt(0.05, "Fraction of ids that go to the test cache (by a stable hash of the id).")
    seed: int = opt(0, "Seed of the id hash: another seed gives another split.")


@dataclass(frozen=True)
class MergeOpts:
    out: Path = opt(REQUIRED, "Folder of the merged cache.")
