"""Summed completion log-probs of a causal LM, without ever building `[B, T, V]` fp32 logits.

`CompletionScorer` runs the transformer body, keeps only the hidden states that predict a
completion token (prompt and pad positions never reach the LM head), and applies the LM head plus
an fp32 log-softmax in chunks of rows. With gradients, a custom autograd function recomputes each
chunk's logits in the backward pass instead of saving them, so peak memory for the head is one
`[chunk, V]` block, not `[N, V]` (what Liger's fused loss does, here with cached reference values).

Numerics: logits come out of the head in the model's dtype and are upcast to fp32 before the
log-softmax (as TRL and HF do); per-token values are fp32 and sums are accumulated in fp64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpocli.batching import ModelInputs
from dpocli.packing import LAYOUT_KWARG, PACKED_ATTENTION, enable_packed_attention


@dataclass(frozen=True)
class SequenceLogps:
    """Per pair [B]: summed completion log-probs (float64) and completion token counts (long).

    `*_token_logps` (optional): per pair, a 1-D float32 tensor of the completion's token log-probs.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    chosen_token_logps: list[torch.Tensor] | None = None
    rejected_token_logps: list[torch.Tensor] | None = None


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    # Upcast to *at least* fp32: bf16/fp16 logits go to fp32 (as TRL and HF do), but fp64 stays
    # fp64. (Casting fp64 down to fp32 made gradcheck and fp64 comparisons meaningless.)
    return torch.promote_types(dtype, torch.float32)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[label] row by row chunk, recomputing logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        out = torch.empty(hidden.shape[0], dtype=_softmax_dtype(hidden.dtype), device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            logits = (hidden[sl] @ weight.T).to(out.dtype)
            lse[sl] = torch.logsumexp(logits, dim=-1)
            out[sl] = logits.gather(1, labels[sl, None]).squeeze(1) - lse[sl]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            logits = (hidden[sl] @ weight.T).to(lse.dtype)
            # d logp[label] / d logits = onehot(label) - softmax(logits)
            grad_logits = -torch.exp(logits - lse[sl, None])
            grad_logits.scatter_add_(1, labels[sl, None], torch.ones_like(lse[sl, None]))
            grad_logits *= grad_out[sl, None]
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[sl] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ hidden[sl]).to(lse.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def token_logps_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            chunk_size: int = 1024) -> torch.Tensor:
    """[N] log-probs of `labels` under logits `hidden @ weight.T` (hidden [N, H], weight [V, H]);
    fp32, or fp64 when `hidden` is fp64."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedTokenLogps.apply(hidden, weight, labels, chunk_size)
    out = torch.empty(hidden.shape[0], dtype=_softmax_dtype(hidden.dtype), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        logits = (hidden[sl] @ weight.T).to(out.dtype)
        out[sl] = logits.gather(1, labels[sl, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return out


def _head_is_plain_linear(model) -> bool:
    """True when logits = lm_head(last hidden state) with no bias, scaling or soft-capping, so the
    chunked head is exact. Other models (Gemma-2 soft-capping, Cohere logit_scale, ...) use the
    model's own forward."""
    head = model.get_output_embeddings()
    config = model.config
    special = any(getattr(config, name, None) not in (None, 1.0)
                  for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"))
    return (isinstance(head, nn.Linear) and head.bias is None and not special
            and hasattr(model, "get_decoder"))


class CompletionScorer(nn.Module):
    """Scores the completion tokens of a batch. Wrap *this* in DDP/FSDP, not the bare model,
    so the distributed wrapper's hooks see the whole computation.

    forward(ModelInputs) -> (segment_sums [2B] float64, token_logps [M] in the inputs' order).
    Every layout (padded, prefix-shared, packed) describes itself as a `batching.ModelInputs`:
    the ids, its mask and positions, and which hidden states score which tokens into which
    segment, so the scorer has one path.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, compile: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.chunked = _head_is_plain_linear(model)
        self.compile = compile
        self._compiled = {}  # a plain dict: compiled wrappers stay out of the module tree

    def _run_body(self, **inputs):
        """The transformer body when the head is chunked, else the whole model; with `compile`,
        torch.compile'd once (dynamic shapes, since batches vary in length)."""
        target = self.model.get_decoder() if self.chunked else self.model
        if self.compile:
            if self.chunked not in self._compiled:
                self._compiled[self.chunked] = torch.compile(target, dynamic=True)
            target = self._compiled[self.chunked]
        return target(**inputs)

    def forward(self, inputs: ModelInputs):
        input_ids, attention_mask = inputs.input_ids, inputs.attention_mask
        rows, width = input_ids.shape
        score_from, labels, units = inputs.score_from, inputs.labels, inputs.units
        position_ids = inputs.position_ids
        extra = {"position_ids": position_ids} if position_ids is not None else {}
        if units is not None:
            if self.model.config._attn_implementation != PACKED_ATTENTION:
                enable_packed_attention(self.model)
            extra[LAYOUT_KWARG] = units
        if attention_mask is not None and attention_mask.is_floating_point():
            # An additive 4-D mask must match the model's dtype: SDPA given an fp32 mask in an
            # fp64 model computed wrong gradients.
            model_dtype = next(self.model.parameters()).dtype
            if attention_mask.dtype != model_dtype:
                blocked = attention_mask != 0
                attention_mask = torch.zeros(attention_mask.shape, dtype=model_dtype,
                                             device=attention_mask.device)
                attention_mask.masked_fill_(blocked, torch.finfo(model_dtype).min)
        if self.chunked:
            hidden = self._run_body(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False, **extra).last_hidden_state
            hidden = hidden.reshape(rows * width, -1)[score_from]
            token_logps = token_logps_from_hidden(
                hidden, self.model.get_output_embeddings().weight, labels, self.chunk_size)
        else:
            logits = self._run_body(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False, **extra).logits
            picked = logits.reshape(rows * width, -1)[score_from]
            picked = picked.to(_softmax_dtype(picked.dtype))
            token_logps = picked.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(picked, -1)
        sums = torch.zeros(inputs.num_segments, dtype=torch.float64, device=input_ids.device)
        sums = sums.index_add(0, inputs.segments, token_logps.double())
        return sums, token_logps


def sequence_logps(scorer: nn.Module, batch, *, keep_token_logps: bool = False) -> SequenceLogps:
    """Run `scorer` (a CompletionScorer, possibly wrapped by DDP/FSDP) on `batch` (any layout:
    `Batch`, `SharedPrefixBatch`, `PackedBatch`), split by pair."""
    b = batch.num_pairs
    inputs = batch.model_inputs()
    sums, token_logps = scorer(inputs)
    lens = torch.bincount(inputs.segments, minlength=2 * b)
    per_row = None
    if keep_token_logps:
        # Grouped by segment (the standard layout is already in that order; the stable sort keeps it).
        values = token_logps.detach().float()[torch.argsort(inputs.segments, stable=True)]
        per_row = list(values.split(lens.tolist()))
    return SequenceLogps(
        chosen_logps=sums[:b], rejected_logps=sums[b:], chosen_len=lens[:b], rejected_len=lens[b:],
        chosen_token_logps=per_row[:b] if per_row else None,
        rejected_token_logps=per_row[b:] if per_row else None)
