"""Padding-free batches: every sequence of a batch laid end to end in one row, and the attention
that keeps them apart.

A padded batch of 2B rows spends compute on pad tokens in every linear layer, and SDPA with a
padding mask cannot use its causal fast path. A packed batch has no pad tokens at all: the
linear layers see exactly the real tokens, and attention runs one causal SDPA call per sequence
(`packed_attention`), so nothing is computed across sequence boundaries either. The dense
block-diagonal mask that transformers would build for packed position ids is never made: it
grows with the square of the packed length ((2B·T)² instead of 2B·T²), and SDPA would compute
every masked block of it.

A packed sequence ("unit") is `[causal part | branch]`:
* without prefix sharing each pair gives two units, `prompt + chosen` and `prompt + rejected`,
  both fully causal (no branch);
* with prefix sharing each pair gives one unit `prompt + chosen | rejected`: the causal part is
  `prompt + chosen`, and the rejected branch attends to the prompt and causally to itself, never
  to the chosen tokens (the same pattern as `SharedPrefixBatch`, without its dense `B·T²` mask).

The model must run `attention.PACKED_ATTENTION` (see `attention.enable_packed_attention`), which
behaves exactly like "sdpa" on ordinary padded inputs, so the same model still scores `Batch`es
and generates. This module is the layout only; the kernels that read it are in attention.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dpocli.errors import DpocliError
from dpocli.model.inputs import ModelInputs


@dataclass(frozen=True)
class PackedUnit:
    """One packed sequence: `causal` tokens from `start`, then `branch` tokens that see the first
    `prefix` tokens of the unit and themselves (causally)."""

    start: int
    causal: int
    prefix: int = 0
    branch: int = 0


@dataclass(frozen=True)
class PackedBatch:
    """B pairs as one padding-free row.

    input_ids, position_ids: [1, N] long; positions restart at 0 for every sequence (and at the
    prompt length for a prefix-shared rejected branch).
    score_from: [M] indices into the N hidden states that predict each scored token.
    labels:     [M] the scored tokens.
    segments:   [M] 0..B-1 for chosen tokens of pair i, B..2B-1 for rejected tokens.
    units:      how the row splits into sequences, for the attention.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    score_from: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor
    units: tuple[PackedUnit, ...]
    num_pairs: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> "PackedBatch":
        moved = (t.to(device, non_blocking=True) for t in (
            self.input_ids, self.position_ids, self.score_from, self.labels, self.segments))
        return PackedBatch(*moved, units=self.units, num_pairs=self.num_pairs)

    def model_inputs(self) -> ModelInputs:
        return ModelInputs(self.input_ids, None, self.position_ids, self.score_from, self.labels,
                           self.segments, num_segments=2 * self.num_pairs, units=self.units)


def collate_packed(prompts: Sequence[Sequence[int]], chosens: Sequence[Sequence[int]],
                   rejecteds: Sequence[Sequence[int]], share_prefix: bool = False) -> PackedBatch:
    """Lay the pairs out end to end (see the module docstring for the two layouts)."""
    b = len(prompts)
    ids: list[int] = []
    positions: list[int] = []
    score_from: list[int] = []
    labels: list[int] = []
    segments: list[int] = []
    units: list[PackedUnit] = []

    def add_scored(tokens, predictors, segment):
        # predictors[j]: the packed index whose hidden state predicts tokens[j]
        score_from.extend(predictors)
        labels.extend(tokens)
        segments.extend([segment] * len(tokens))

    for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
        np_, nc, nr = len(p), len(c), len(r)
        if share_prefix:
            start = len(ids)
            ids.extend(list(p) + list(c) + list(r))
            positions.extend(list(range(np_ + nc)) + list(range(np_, np_ + nr)))
            units.append(PackedUnit(start, np_ + nc, prefix=np_, branch=nr))
            add_scored(c, [start + np_ - 1 + j for j in range(nc)], i)
            # the first rejected token is predicted from the last prompt position
            rejected_from = [start + np_ - 1] + [start + np_ + nc + j - 1 for j in range(1, nr)]
            add_scored(r, rejected_from, b + i)
        else:
            for completion, segment in ((c, i), (r, b + i)):
                start, n = len(ids), np_ + len(completion)
                ids.extend(list(p) + list(completion))
                positions.extend(range(n))
                units.append(PackedUnit(start, n))
                add_scored(completion, [start + np_ - 1 + j for j in range(len(completion))],
                           segment)
    as_row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
    return PackedBatch(as_row(ids), as_row(positions), torch.tensor(score_from, dtype=torch.long),
                       torch.tensor(labels, dtype=torch.long),
                       torch.tensor(segments, dtype=torch.long), tuple(units), b)


def check_layout_flags(prefix_sharing: bool, packing: bool, attn_implementation: str | None) -> None:
    """Refuse flag combinations the layouts cannot honour, before any work starts."""
    if packing and attn_implementation not in (None, "sdpa"):
        raise DpocliError(f"runs its own per-sequence SDPA attention, not '{attn_implementation}'",
                          field="--packing", hint="drop --attn-implementation")
    if prefix_sharing and not packing and "flash" in (attn_implementation or ""):
        raise DpocliError("needs a custom attention mask, which flash attention does not take",
                          field="--prefix-sharing", hint="add --packing, or use --attn-implementation sdpa")
