"""What a scorer's forward takes, whatever the batch layout: padded, prefix-shared or packed
(each layout's `model_inputs()` describes itself as one)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelInputs:
    """What the scorer's forward takes, whatever the batch layout (each layout's `model_inputs`).

    input_ids:      [R, T] long.
    attention_mask: [R, T] 0/1 padding mask, a [R, 1, T, T] additive mask, or None (packed).
    position_ids:   [R, T] long, or None for positions 0..T-1.
    score_from:     [M] flat indices into the R*T hidden states; each predicts one scored token.
    labels:         [M] the scored tokens.
    segments:       [M] the sequence each scored token belongs to: pair i's chosen completion is
                    segment i, its rejected completion segment B + i (so 2B segments).
    num_segments:   2B.
    units:          the packed row's sequences, for the packed attention (None otherwise).
    extra:          further model keyword arguments (a vision-language batch's pixel values).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    score_from: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor
    num_segments: int
    units: tuple | None = None
    extra: dict | None = None
