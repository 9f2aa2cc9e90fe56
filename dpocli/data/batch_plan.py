"""The reference batch plan: which pairs precompute scored together, as pure index plans.

`dpo eval` replays this plan to reproduce the cache bit for bit, and the cache commands that derive
a cache from another (`dpo cache filter|split|merge`) record it per shard; both need it without
torch, so it lives here and batching.py (the tensors) re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dpocli.errors import DpocliError


def plan_by_length(
    seq_lens: Sequence[int], *, batch_size: int | None = None, max_tokens: int | None = None
) -> list[list[int]]:
    """Inference batches over all rows, longest first, so padding is minimal and an out-of-memory
    error (if the budget is too large) shows up on the very first batch.

    seq_lens: per pair, the longer of prompt+chosen and prompt+rejected.
    max_tokens: budget of padded tokens per batch, counting both rows of every pair (2·B·T).
    """
    if (batch_size is None) == (max_tokens is None):
        raise ValueError("give exactly one of batch_size and max_tokens")
    order = sorted(range(len(seq_lens)), key=lambda i: (-seq_lens[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current:
            full = (
                len(current) >= batch_size
                if batch_size is not None
                else 2 * (len(current) + 1) * seq_lens[current[0]] > max_tokens
            )
            if full:
                batches.append(current)
                current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class Batching:
    """How precompute grouped and laid out the reference forwards of a shard.

    Batch composition moves the reference values at the ulp level (padding width, packed
    neighbours), and `dpo eval` replays it so that the reference scores its own cache bit for bit.
    The manifest records it in two parts (`layout()` and `budget()`):
    * the layout (rows_per_shard, packing, prefix_sharing) is part of the cache's identity (the
      spec): a rerun with another layout is a different cache, refused or redone with --overwrite;
    * the budget (batch_size or max_tokens) is recorded per shard, so a run that ran out of
      memory can resume with a smaller budget and every shard still replays exactly.

    batch_size / max_tokens: exactly one is set (pairs per batch, or padded-token budget).
    rows_per_shard: input rows per shard; batches never cross a shard.
    packing, prefix_sharing: the batch layout (`make_batch`).
    """

    batch_size: int | None
    max_tokens: int | None
    rows_per_shard: int
    packing: bool
    prefix_sharing: bool

    def layout(self) -> dict:
        return {
            "rows_per_shard": self.rows_per_shard,
            "packing": self.packing,
            "prefix_sharing": self.prefix_sharing,
        }

    def budget(self) -> dict:
        return {"batch_size": self.batch_size, "max_tokens": self.max_tokens}

    @classmethod
    def from_records(cls, layout: dict, budget: dict, where: str) -> "Batching":
        """The inverse of `layout()` + `budget()`, refusing a record with other fields."""
        expected = (
            ("spec.batching", layout, ("rows_per_shard", "packing", "prefix_sharing")),
            ("shards[].budget", budget, ("batch_size", "max_tokens")),
        )
        for part, record, names in expected:
            if not isinstance(record, dict) or set(record) != set(names):
                raise DpocliError(
                    f"has a {part} record {record!r}, expected the fields {list(names)}",
                    file=where,
                    field=part,
                    hint="recreate the cache with this version's `dpo precompute-ref`",
                )
        return cls(**budget, **layout)

    def with_budget(self, max_tokens: int | None) -> "Batching":
        """The same layout under another token budget (eval's --max-tokens: faster, and equal to
        the cached values only to ~1e-6 because the batches differ)."""
        if max_tokens is None:
            return self
        return Batching(None, max_tokens, self.rows_per_shard, self.packing, self.prefix_sharing)


def plan_reference_batches(lengths: Sequence[tuple[int, int, int]], batching: Batching) -> list[list[int]]:
    """The reference forwards of ONE shard, as positions into its rows (in the shard's stored order).

    lengths: per row, (prompt, chosen, rejected) token counts; a pair is sorted and budgeted by
    its longer sequence, prompt + max(chosen, rejected).
    The only place this plan is made: precompute scores each shard with it and `dpo eval` replays
    it per stored shard, so both run the same batches and therefore get the same bits.
    """
    seq_lens = [p + max(c, r) for p, c, r in lengths]
    return plan_by_length(seq_lens, batch_size=batching.batch_size, max_tokens=batching.max_tokens)
