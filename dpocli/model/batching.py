"""Decide which pairs go together (pure index plans), then pad them into tensors.

Planning is index-only so it is cheap to test and identical on every rank. Collation follows
TRL's layout: one batch of 2B right-padded rows, the B `prompt + chosen` rows first, then the B
`prompt + rejected` rows, and a mask marking the completion tokens that get scored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

# The reference batch plan lives in batch_plan.py (no torch: the cache commands replan without it);
# its names are importable from here too.
from dpocli.data.batch_plan import Batching, plan_by_length, plan_reference_batches  # noqa: F401
from dpocli.model.inputs import ModelInputs
from dpocli.model.packing import collate_packed


@dataclass(frozen=True)
class Batch:
    """B preference pairs as 2B padded sequences.

    input_ids:       [2B, T] long; rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected.
    attention_mask:  [2B, T] long; 1 on real tokens, 0 on right padding.
    completion_mask: [2B, T] bool; True on completion tokens (the ones scored; prompt and pad False).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device, non_blocking=True),
                     self.attention_mask.to(device, non_blocking=True),
                     self.completion_mask.to(device, non_blocking=True))

    def model_inputs(self) -> ModelInputs:
        """Token t of a row is scored from position t - 1; row r is segment r."""
        rows, width = self.input_ids.shape
        scored = self.completion_mask[:, 1:]
        flat = torch.arange(rows * width, device=self.input_ids.device).view(rows, width)
        segments = torch.arange(rows, device=self.input_ids.device)[:, None].expand_as(scored)
        return ModelInputs(self.input_ids, self.attention_mask, None, score_from=flat[:, :-1][scored],
                           labels=self.input_ids[:, 1:][scored], segments=segments[scored],
                           num_segments=rows)


def collate(prompts: Sequence[Sequence[int]], chosens: Sequence[Sequence[int]],
            rejecteds: Sequence[Sequence[int]], pad_id: int, pad_to_multiple_of: int = 1) -> Batch:
    """Pad pairs into a `Batch`. Each list holds one entry per pair (prompt and completion ids)."""
    rows = [(p, c) for p, c in zip(prompts, chosens)] + [(p, r) for p, r in zip(prompts, rejecteds)]
    longest = max(len(p) + len(c) for p, c in rows)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, len(p):n] = True
    return Batch(input_ids, attention_mask, completion_mask)


def plan_epoch(num_pairs: int, batch_size: int, *, epoch: int, seed: int, shuffle: bool = True,
               seq_lens: Sequence[int] | None = None, group_by_length: bool = False) -> list[list[int]]:
    """Training batches for one epoch: fixed `batch_size` pairs each (the last may be smaller).

    The order is a pure function of (seed, epoch), so resuming needs only the batch position.
    With `shuffle=False` batches follow row order (to reproduce another tool step by step).
    `group_by_length` (needs `seq_lens`) sorts each window of 50 batches by length and shuffles
    the batches, as HF's LengthGroupedSampler does: less padding, still random batch order.
    """
    order = list(range(num_pairs))
    rng = random.Random(f"{seed}:{epoch}")
    if shuffle:
        rng.shuffle(order)
    if group_by_length and seq_lens is not None:
        window = 50 * batch_size
        order = [i for start in range(0, num_pairs, window)
                 for i in sorted(order[start:start + window], key=lambda j: -seq_lens[j])]
    batches = [order[i:i + batch_size] for i in range(0, num_pairs, batch_size)]
    if group_by_length and shuffle:
        rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class SharedPrefixBatch:
    """B pairs as B rows `prompt + chosen + rejected`: the prompt is run once per pair instead of
    twice ("Accelerating DPO with Prefix Sharing"). A 4-D mask lets chosen tokens see the prompt
    and earlier chosen tokens, and rejected tokens see the prompt and earlier rejected tokens
    (never chosen); position ids restart after the prompt for the rejected part.

    input_ids:      [B, T] long, right-padded.
    attention_mask: [B, 1, T, T] float additive mask (0 = attend, dtype min = blocked).
    position_ids:   [B, T] long.
    score_from:     [N] flat indices into the [B*T] hidden states that predict each scored token.
    labels:         [N] the scored tokens.
    segments:       [N] 0..B-1 for chosen tokens of pair i, B..2B-1 for rejected tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    score_from: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens actually run through the model (the prompt once per pair)."""
        return int((self.position_ids > 0).sum() + self.input_ids.shape[0])

    def to(self, device) -> "SharedPrefixBatch":
        return SharedPrefixBatch(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.attention_mask, self.position_ids, self.score_from, self.labels,
            self.segments)))

    def model_inputs(self) -> ModelInputs:
        return ModelInputs(self.input_ids, self.attention_mask, self.position_ids, self.score_from,
                           self.labels, self.segments, num_segments=2 * self.num_pairs)


def collate_shared(prompts: Sequence[Sequence[int]], chosens: Sequence[Sequence[int]],
                   rejecteds: Sequence[Sequence[int]], pad_id: int,
                   mask_dtype: torch.dtype = torch.float32) -> SharedPrefixBatch:
    """Pack each pair into one row with a prefix-sharing mask (see `SharedPrefixBatch`)."""
    b = len(prompts)
    width = max(len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosens, rejecteds))
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    allowed = torch.zeros((b, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    score_from, labels, segments = [], [], []
    for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
        np_, nc, nr = len(p), len(c), len(r)
        end = np_ + nc + nr
        input_ids[i, :end] = torch.tensor(list(p) + list(c) + list(r), dtype=torch.long)
        position_ids[i, :np_ + nc] = torch.arange(np_ + nc)
        position_ids[i, np_ + nc:end] = torch.arange(np_, np_ + nr)
        allowed[i, :np_ + nc, :np_ + nc] = causal[:np_ + nc, :np_ + nc]
        allowed[i, np_ + nc:end, :np_] = True
        allowed[i, np_ + nc:end, np_ + nc:end] = causal[:nr, :nr]
        pad = torch.arange(end, width)
        allowed[i, pad, pad] = True  # pad queries attend to themselves only (no all-blocked row)
        row = i * width
        # chosen token at np_+j is predicted from position np_+j-1; the first rejected token is
        # predicted from the last prompt position, later ones from the previous rejected token.
        score_from += [row + np_ - 1 + j for j in range(nc)]
        score_from += [row + np_ - 1] + [row + np_ + nc + j - 1 for j in range(1, nr)]
        labels += list(c) + list(r)
        segments += [i] * nc + [b + i] * nr
    mask = torch.zeros((b, 1, width, width), dtype=mask_dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    return SharedPrefixBatch(input_ids, mask, position_ids, torch.tensor(score_from),
                             torch.tensor(labels), torch.tensor(segments))


def make_batch(prompts, chosens, rejecteds, pad_id: int, prefix_sharing: bool = False,
               packing: bool = False):
    """The model inputs for a list of pairs: a padding-free `PackedBatch` when `packing` (its
    prompt shared per pair when `prefix_sharing` too), else a `SharedPrefixBatch` when
    `prefix_sharing`, else the standard 2B-row `Batch`."""
    if packing:
        return collate_packed(prompts, chosens, rejecteds, share_prefix=prefix_sharing)
    if prefix_sharing:
        return collate_shared(prompts, chosens, rejecteds, pad_id)
    return collate(prompts, chosens, rejecteds, pad_id)
