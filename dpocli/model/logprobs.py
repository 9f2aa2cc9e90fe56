"""Summed completion log-probs of a causal LM, without ever building `[B, T, V]` fp32 logits.

`CompletionScorer` runs the transformer body, keeps only the hidden states that predict a
completion token (prompt and pad positions never reach the LM head), and applies the LM head plus
an fp32 log-softmax in chunks of rows. With gradients, a custom autograd function recomputes each
chunk's logits in the backward pass instead of saving them, so peak memory for the head is one
`[chunk, V]` block, not `[N, V]` (what Liger's fused loss does, here with cached reference values).

Numerics: logits come out of the head in the model's dtype and are upcast to fp32 before the
log-softmax (as TRL and HF do); per-token values are fp32 and sums are accumulated in fp64.

On request (`token_stats=True`, training only) the same chunks also yield TRL 1.16's per-token
LM-head values (`TOKEN_STATS`), detached, so the `entropy`, `logits/*` and `mean_token_accuracy`
metrics and the WPO weights cost no second pass over the vocabulary.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dpocli.errors import DpocliError
from dpocli.model.attention import LAYOUT_KWARG, PACKED_ATTENTION, enable_packed_attention
from dpocli.model.inputs import ModelInputs

# Per-token values of the next-token distribution (logits z over the vocabulary V, label y), as TRL
# 1.16's fused LM head computes them (trl/kernels/chunked_logprob.py): the entropy
# logsumexp(z) - Σ_v p_v·z_v; the mean logit Σ_v z_v / V; 1[argmax z = y] (first maximum wins, like
# torch.argmax); and log Σ_v p_v² = logsumexp(2z) - 2·logsumexp(z), which WPO's weights use.
TOKEN_STATS = ("entropy", "mean_logit", "top1", "log_sum_sq_probs")


def _chunk_stats(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[n, len(TOKEN_STATS)] from one chunk of logits [n, V] (already upcast) and its logsumexp [n]."""
    probs = torch.exp(logits - lse[:, None])
    return torch.stack([lse - (probs * logits).sum(-1), logits.mean(-1),
                        (logits.argmax(-1) == labels).to(logits.dtype),
                        torch.logsumexp(2 * logits, dim=-1) - 2 * lse], dim=1)


@dataclass(frozen=True)
class TokenStats:
    """Per segment [2B] (pair i's chosen is i, its rejected B + i): sums over the completion
    tokens, float64, detached, of TRL's per-token LM-head values (see `TOKEN_STATS`).

    entropy:     Σ_t entropy of the next-token distribution.
    mean_logit:  Σ_t (vocabulary-mean logit).
    top1:        Σ_t 1[argmax = label] (the number of tokens the model would have predicted).
    wpo_logps:   Σ_t (log p(y_t) - log Σ_v p_v²), WPO's aligned log-probs (arXiv 2406.11827 Eq. 2).
    """

    entropy: torch.Tensor
    mean_logit: torch.Tensor
    top1: torch.Tensor
    wpo_logps: torch.Tensor


@dataclass(frozen=True)
class SequenceLogps:
    """Per pair [B]: summed completion log-probs (float64) and completion token counts (long).

    `*_token_logps` (optional): per pair, a 1-D float32 tensor of the completion's token log-probs.
    `stats` (optional): TRL's per-token LM-head values summed per segment.
    With LD-DPO (`ld_alpha`), `*_logps` are the length-desensitised sums and
    `chosen_plain_logps` the plain ones (TRL's `sft` term uses those).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    chosen_token_logps: list[torch.Tensor] | None = None
    rejected_token_logps: list[torch.Tensor] | None = None
    stats: TokenStats | None = None
    chosen_plain_logps: torch.Tensor | None = None
    router_aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (scalar, differentiable)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    # Upcast to *at least* fp32: bf16/fp16 logits go to fp32 (as TRL and HF do), but fp64 stays
    # fp64. (Casting fp64 down to fp32 made gradcheck and fp64 comparisons meaningless.)
    return torch.promote_types(dtype, torch.float32)


@contextmanager
def gathered(module: nn.Module):
    """`module` with its whole weights for the block. The chunked path reads the LM head's weight
    without calling its forward, so a head that is its own FSDP2 unit (forward-only sharding,
    `distributed.shard_for_inference`) is all-gathered here and resharded after; any other
    module (plain, or inside a sharded root, which its forward gathers) is given as it is."""
    if not callable(getattr(module, "unshard", None)):  # not an FSDPModule
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


class _ChunkedTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[label] row by row chunk, recomputing logits in backward.

    Second output: the `TOKEN_STATS` of every row ([N, 4], no gradient) when `with_stats`, else an
    empty [N, 0] tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, with_stats=False):
        out, lse, stats = _chunked_forward(hidden, weight, labels, chunk_size, with_stats)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):
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
        return grad_hidden, grad_weight, None, None, None


@torch.no_grad()
def _chunked_forward(hidden, weight, labels, chunk_size, with_stats):
    """(token log-probs [N], logsumexp [N], stats [N, 4] or [N, 0]), one [chunk, V] block at a time."""
    out = torch.empty(hidden.shape[0], dtype=_softmax_dtype(hidden.dtype), device=hidden.device)
    lse = torch.empty_like(out)
    stats = out.new_empty((hidden.shape[0], len(TOKEN_STATS) if with_stats else 0))
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        logits = (hidden[sl] @ weight.T).to(out.dtype)
        lse[sl] = torch.logsumexp(logits, dim=-1)
        out[sl] = logits.gather(1, labels[sl, None]).squeeze(1) - lse[sl]
        if with_stats:
            stats[sl] = _chunk_stats(logits, lse[sl], labels[sl])
    return out, lse, stats


def token_logps_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            chunk_size: int = 1024, *, with_stats: bool = False):
    """[N] log-probs of `labels` under logits `hidden @ weight.T` (hidden [N, H], weight [V, H]);
    fp32, or fp64 when `hidden` is fp64. With `with_stats`, returns (log-probs, stats [N, 4])."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out, stats = _ChunkedTokenLogps.apply(hidden, weight, labels, chunk_size, with_stats)
    else:
        out, _, stats = _chunked_forward(hidden, weight, labels, chunk_size, with_stats)
    return (out, stats) if with_stats else out


def _head_is_plain_linear(model) -> bool:
    """True when logits = lm_head(last hidden state) with no bias, scaling or soft-capping, so the
    chunked head is exact. Other models (Gemma-2 soft-capping, Cohere logit_scale, ...), and a
    head bitsandbytes quantized (a Linear subclass holding packed integers), use the model's own
    forward."""
    head = model.get_output_embeddings()
    config = model.config
    special = any(getattr(config, name, None) not in (None, 1.0)
                  for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"))
    return (isinstance(head, nn.Linear) and head.bias is None and head.weight.is_floating_point()
            and not special and hasattr(model, "get_decoder"))


class CompletionScorer(nn.Module):
    """Scores the completion tokens of a batch. Wrap *this* in DDP/FSDP, not the bare model,
    so the distributed wrapper's hooks see the whole computation.

    forward(ModelInputs, token_stats=False, router_aux=False) -> (segment_sums [2B] float64,
    token_logps [M] in the inputs' order, per-token `TOKEN_STATS` [M, 4] (detached) or None without
    `token_stats`, the MoE router load-balancing loss (a scalar) or None without `router_aux`).
    Every layout (padded, prefix-shared, packed) describes itself as a `inputs.ModelInputs`:
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

    def _run_body(self, vision: bool = False, **inputs):
        """The transformer body when the head is chunked, else the whole model; with `compile`,
        torch.compile'd once (dynamic shapes, since batches vary in length). With `vision` (pixel
        values among the inputs) the body is the vision-language model's `model` (vision tower,
        projector and language model), which merges the image features into the embeddings."""
        if self.chunked and vision:  # (under peft, the wrapped model's: its layers hold the adapters)
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            target = base.model
        elif self.chunked:
            target = self.model.get_decoder()
        else:
            target = self.model
        if self.compile:
            key = (self.chunked, vision)
            if key not in self._compiled:
                self._compiled[key] = torch.compile(target, dynamic=True)
            target = self._compiled[key]
        return target(**inputs)

    def forward(self, inputs: ModelInputs, token_stats: bool = False, router_aux: bool = False):
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
        if router_aux:
            extra["output_router_logits"] = True
        extra["vision"] = bool(inputs.extra)
        extra.update(inputs.extra or {})
        if self.chunked:
            body = self._run_body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  **extra)
            hidden = body.last_hidden_state
            hidden = hidden.reshape(rows * width, -1)[score_from]
            with gathered(self.model.get_output_embeddings()) as head:
                scored = token_logps_from_hidden(hidden, head.weight, labels, self.chunk_size,
                                                 with_stats=token_stats)
            token_logps, stats = scored if token_stats else (scored, None)
        else:
            body = self._run_body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  **extra)
            logits = body.logits
            picked = logits.reshape(rows * width, -1)[score_from]
            picked = picked.to(_softmax_dtype(picked.dtype))
            lse = torch.logsumexp(picked, -1)
            token_logps = picked.gather(1, labels[:, None]).squeeze(1) - lse
            stats = _chunk_stats(picked.detach(), lse.detach(), labels) if token_stats else None
        sums = torch.zeros(inputs.num_segments, dtype=torch.float64, device=input_ids.device)
        sums = sums.index_add(0, inputs.segments, token_logps.double())
        aux = _router_aux_loss(self.model.config, body.router_logits, attention_mask) if router_aux else None
        return sums, token_logps, (stats if token_stats else None), aux


def _router_aux_loss(config, router_logits, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss of one forward (transformers' Mixtral function, which every MoE
    family shares and TRL 1.16 calls), over the real tokens of a padded batch. Packed rows have no
    pad and a prefix-shared batch a 4-D mask, so there every position counts (TRL: the same for its
    padding-free rows)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    config = config.get_text_config()
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    return load_balancing_loss_func(router_logits, config.num_experts, config.num_experts_per_tok, mask)


def router_aux_coefficient(model, requested: float | None) -> float:
    """TRL's `router_aux_loss_coef`: the requested value, else the model config's (0 when it has
    none). A model without `output_router_logits` in its config has no router loss to weight: a
    nonzero request is refused (exit 2)."""
    config = model.config.get_text_config()
    if requested and not hasattr(config, "output_router_logits"):
        raise DpocliError(f"is {requested}, but {type(model).__name__} is not a Mixture-of-Experts model "
                          "that returns router logits", field="--router-aux-loss-coef",
                          hint="drop --router-aux-loss-coef for this model")
    if not hasattr(config, "output_router_logits"):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) if requested is None else requested)


def sequence_logps(scorer: nn.Module, batch, *, keep_token_logps: bool = False, token_stats: bool = False,
                   ld_alpha: float | None = None, router_aux: bool = False) -> SequenceLogps:
    """Run `scorer` (a CompletionScorer, possibly wrapped by DDP/FSDP) on `batch` (any layout:
    `Batch`, `SharedPrefixBatch`, `PackedBatch`), split by pair.

    token_stats: also sum TRL's per-token LM-head values per segment (`SequenceLogps.stats`).
    ld_alpha: LD-DPO (arXiv 2409.06411, TRL's `ld_alpha`): each completion's sum becomes
    Σ_{t<=ℓ} log p_t + α·Σ_{t>ℓ} log p_t with ℓ = min(|y_w|, |y_l|) of its pair.
    router_aux: also return the MoE router load-balancing loss of the forward.
    """
    b = batch.num_pairs
    inputs = batch.model_inputs()
    sums, token_logps, stats, aux = scorer(inputs, token_stats=token_stats, router_aux=router_aux)
    lens = torch.bincount(inputs.segments, minlength=2 * b)
    # Grouped by segment (every layout lists a segment's tokens in completion order; the stable
    # sort keeps it, and the standard layout is already grouped).
    order = torch.argsort(inputs.segments, stable=True)
    per_row = None
    if keep_token_logps:
        per_row = list(token_logps.detach().float()[order].split(lens.tolist()))
    plain = None
    if ld_alpha is not None:
        plain = sums[:b]
        sums = _ld_sums(token_logps, inputs.segments, order, lens, ld_alpha)
    return SequenceLogps(
        chosen_logps=sums[:b], rejected_logps=sums[b:], chosen_len=lens[:b], rejected_len=lens[b:],
        chosen_token_logps=per_row[:b] if per_row else None,
        rejected_token_logps=per_row[b:] if per_row else None,
        stats=_segment_stats(token_logps, stats, inputs) if stats is not None else None,
        chosen_plain_logps=plain, router_aux_loss=aux)


def _ld_sums(token_logps, segments, order, lens, alpha: float) -> torch.Tensor:
    """[2B] float64 LD-DPO sums (differentiable): a token at 0-based position k of its completion
    counts fully when k < min(|y_w|, |y_l|) of its pair, else with weight α (TRL `ld_alpha`)."""
    b = lens.shape[0] // 2
    starts = torch.cumsum(lens, 0) - lens
    position = torch.empty_like(segments)
    position[order] = torch.arange(segments.shape[0], device=segments.device) - starts[segments[order]]
    shared = torch.minimum(lens[:b], lens[b:]).repeat(2)
    weight = torch.where(position < shared[segments], 1.0, alpha).to(torch.float64)
    out = torch.zeros(2 * b, dtype=torch.float64, device=token_logps.device)
    return out.index_add(0, segments, token_logps.double() * weight)


def _segment_stats(token_logps, stats, inputs) -> TokenStats:
    """Per-segment sums of the per-token `TOKEN_STATS` (and WPO's aligned log-probs)."""
    cols = torch.cat([stats[:, :3], (token_logps.detach() - stats[:, 3])[:, None]], dim=1).double()
    sums = torch.zeros((inputs.num_segments, 4), dtype=torch.float64, device=cols.device)
    sums = sums.index_add(0, inputs.segments, cols)
    return TokenStats(*sums.unbind(1))
