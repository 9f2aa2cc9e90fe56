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

The model must run `PACKED_ATTENTION` (see `enable_packed_attention`). It behaves exactly like
"sdpa" on ordinary padded inputs, so the same model still scores `Batch`es and generates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from dpocli.batching import ModelInputs
from dpocli.errors import DpocliError

PACKED_ATTENTION = "dpocli_packed"
LAYOUT_KWARG = "dpocli_packed_layout"


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


def _window_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                 window: int | None) -> torch.Tensor:
    """[q, k] bool: key at or before the query and, with a sliding window, fewer than `window`
    positions back (transformers' `kv_idx > q_idx - sliding_window`)."""
    q, k = query_positions[:, None], key_positions[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return allowed


def _check_supported(kwargs: dict) -> None:
    for name, what in (("softcap", "attention-logit soft-capping"), ("s_aux", "attention sinks")):
        if kwargs.get(name) is not None:
            raise DpocliError(f"does not support this model's {what}", field="--packing",
                              hint="train without --packing")


@torch.compiler.disable
def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """Attention over a packed row, one SDPA call per unit (two for a prefix-shared unit).

    query [1, H, N, D], key/value [1, H_kv, N, D] (transformers' attention-interface layout);
    returns ([1, N, H, D], None). Without a packed layout it is transformers' "sdpa".
    """
    units = kwargs.pop(LAYOUT_KWARG, None)
    if units is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    _check_supported(kwargs)
    window = kwargs.get("sliding_window")
    dropout = dropout if module.training else 0.0
    device = query.device
    # torch.split, not one slice per unit: the backward of a split is one concatenation, while
    # each slice's backward would write a zero-filled gradient as long as the whole row.
    sizes = [n for u in units for n in ((u.causal, u.branch) if u.branch else (u.causal,))]
    qs, ks, vs = (t.split(sizes, dim=2) for t in (query, key, value))
    pieces, part = [], 0
    for u in units:
        q, k, v = qs[part], ks[part], vs[part]
        if window is None or u.causal <= window:  # plain causal: SDPA's fast path, no mask
            pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout,
                                                         is_causal=True, scale=scaling))
        else:
            positions = torch.arange(u.causal, device=device)
            pieces.append(F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scaling,
                attn_mask=_window_mask(positions, positions, window)))
        if u.branch:
            # The branch continues the prefix: its positions are prefix .. prefix+branch-1.
            qb, kb, vb = qs[part + 1], ks[part + 1], vs[part + 1]
            keys = torch.cat([k[:, :, :u.prefix], kb], dim=2)
            values = torch.cat([v[:, :, :u.prefix], vb], dim=2)
            branch_positions = torch.arange(u.prefix, u.prefix + u.branch, device=device)
            key_positions = torch.cat([torch.arange(u.prefix, device=device), branch_positions])
            pieces.append(F.scaled_dot_product_attention(
                qb, keys, values, dropout_p=dropout, scale=scaling,
                attn_mask=_window_mask(branch_positions, key_positions, window)))
        part += 2 if u.branch else 1
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.transpose(1, 2).contiguous(), None


def _packed_mask(*args, attention_mask=None, **kwargs):
    """The mask builder for `PACKED_ATTENTION`. Packed calls pass no 2-D mask, and get none: the
    units say everything (building transformers' dense packed-sequence mask would cost N²).
    Ordinary padded calls get exactly what "sdpa" gets."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def enable_packed_attention(model) -> None:
    """Register `PACKED_ATTENTION` with transformers and switch `model` to it. The kernel behind
    the name is chosen here, once (`dpocli.attention.packed_kernel`)."""
    from transformers import AttentionInterface

    from dpocli.attention import packed_kernel  # per-sequence SDPA unless $DPOCLI_ATTN_KERNEL
    AttentionInterface.register(PACKED_ATTENTION, packed_kernel())
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds masks itself; packed calls ignore them
        pass
    else:
        AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    model.config._attn_implementation = PACKED_ATTENTION
