"""The attention kernel behind `--packing`, chosen once per process.

Two implementations compute the same attention over a packed row (layouts: `dpocli.model.packing`):

* "sdpa" (the default everywhere): `packing.packed_attention`, one SDPA call per sequence (two
  for a prefix-shared unit). Verified on CPU against the padded layout, gradients included.
* "flex": one FlexAttention call per layer over the whole row. A `BlockMask` built once per batch
  keeps sequences apart and lets each rejected branch see its prompt and, causally, itself, so no
  Python loop over sequences runs per layer and fully masked 128×128 blocks are skipped.
  On CUDA it runs `torch.compile(flex_attention)` (the fused Triton kernel). On CPU it runs
  torch's eager, unfused reference (it materialises the N×N scores: for tests, not speed), and
  FORWARD ONLY: torch has no CPU backward for FlexAttention, so CPU training refuses it.
  UNVERIFIED ON CUDA: it has never run on a GPU. It is off unless asked for with
  `DPOCLI_ATTN_KERNEL=flex`; only its CPU forward is tested (tests/test_attention.py).

`torch.nn.attention.varlen.varlen_attn` (cu_seqlens, flash kernels) would serve plain packing in
one call, but it is CUDA-only (nothing here could test it) and its signature changed between
releases (2.10: an `is_causal` flag, no `scale`, no GQA; 2.12: `window_size` in place of
`is_causal`, and `enable_gqa`), so it is not offered until it can be tried on torch 2.11.

The choice is recorded as `attention_kernel` in the cache manifest and the training summary
(`describe`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dpocli.errors import DpocliError
from dpocli.model.packing import PackedUnit

PACKED_ATTENTION = "dpocli_packed"
LAYOUT_KWARG = "dpocli_packed_layout"

ENV = "DPOCLI_ATTN_KERNEL"
KERNELS = ("sdpa", "flex")
BLOCK = 128  # FlexAttention's block size; rows are padded to a multiple (fewer recompiles)


def kernel_name() -> str:
    """The packed-attention kernel this process uses: $DPOCLI_ATTN_KERNEL, default "sdpa"."""
    name = os.environ.get(ENV, "").strip().lower() or "sdpa"
    if name not in KERNELS:
        raise DpocliError(f"unknown attention kernel '{name}'", field=ENV,
                          hint=f"use one of: {', '.join(KERNELS)}")
    if name == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            raise DpocliError(f"needs FlexAttention, which torch {torch.__version__} lacks",
                              field=ENV, hint="unset it (the per-sequence SDPA path needs nothing)"
                              ) from None
    return name


def packed_kernel():
    """The attention function to register as `packing.PACKED_ATTENTION`."""
    return {"sdpa": packed_attention, "flex": flex_packed_attention}[kernel_name()]


def describe(packing: bool, attn_implementation: str | None) -> str:
    """What runs attention, for run records: "packed-sdpa" / "packed-flex" with --packing, else
    the model's own implementation ("default" when transformers picks it)."""
    return f"packed-{kernel_name()}" if packing else (attn_implementation or "default")


# --------------------------------------------------------------------------------------------
# FlexAttention


def layout_tensors(units: tuple[PackedUnit, ...], length: int, device) -> dict[str, torch.Tensor]:
    """Per-token tensors [length] describing the row; tokens past the last unit (padding up to
    `length`) form one extra unit of their own, so they never mix with real tokens.

    doc: unit index; local: index inside the unit; branch: token is in a rejected branch;
    prefix: its unit's prompt length; position: the token's position id (branches restart at
    the prefix, as in `collate_packed`), which is what a sliding window measures."""
    lengths = [u.causal + u.branch for u in units]
    used = sum(lengths)
    lengths.append(length - used)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    causal = torch.tensor([u.causal for u in units] + [lengths[-1]])
    prefix = torch.tensor([u.prefix for u in units] + [0])
    local = torch.arange(length) - starts[doc]
    branch = local >= causal[doc]
    position = torch.where(branch, prefix[doc] + local - causal[doc], local)
    return {k: v.to(device) for k, v in dict(doc=doc, local=local, branch=branch,
                                                prefix=prefix[doc], position=position).items()}


def packed_mask_mod(t: dict[str, torch.Tensor], window: int | None):
    """FlexAttention mask_mod: same unit, key not after the query, and a branch query sees only
    the prompt part of the causal tokens (never the chosen ones). Branch tokens come after the
    causal part of their unit, so a causal query never reaches them."""
    doc, local, branch, prefix, position = (t[k] for k in ("doc", "local", "branch", "prefix",
                                                            "position"))

    def mask_mod(b, h, q, kv):
        allowed = (doc[q] == doc[kv]) & (kv <= q)
        allowed = allowed & (~branch[q] | branch[kv] | (local[kv] < prefix[q]))
        if window is not None:  # transformers' rule: fewer than `window` positions back
            allowed = allowed & (position[q] - position[kv] < window)
        return allowed

    return mask_mod


class _FlexState:
    """The block masks of the batch being run. Every layer of one forward gets the same `units`
    object, so an identity check finds them; a new batch replaces them."""

    units = None
    masks: dict = {}
    flex = None


@torch.compiler.disable
def _block_mask(units, length: int, window: int | None, device):
    from torch.nn.attention.flex_attention import create_block_mask
    if _FlexState.units is not units:
        _FlexState.units, _FlexState.masks = units, {}
    key = (length, window, str(device))
    if key not in _FlexState.masks:
        mask_mod = packed_mask_mod(layout_tensors(units, length, device), window)
        _FlexState.masks[key] = create_block_mask(mask_mod, None, None, length, length,
                                                  device=device, BLOCK_SIZE=BLOCK)
    return _FlexState.masks[key]


def _flex_fn(device: torch.device):
    # Chosen on the first call (the device is known only then) and kept: compiled on CUDA, where
    # eager FlexAttention would materialise the scores; eager on CPU (fp64-capable, no compiler).
    if _FlexState.flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FlexState.flex = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    return _FlexState.flex


def flex_packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """`packing.packed_attention`'s contract (query [1, H, N, D], key/value [1, H_kv, N, D] ->
    ([1, N, H, D], None); plain "sdpa" without a packed layout) in one FlexAttention call."""
    units = kwargs.pop(LAYOUT_KWARG, None)
    if units is None:
        return packed_attention(module, query, key, value, attention_mask, dropout=dropout,
                                scaling=scaling, **kwargs)
    check_supported(kwargs)
    if dropout and module.training:
        raise DpocliError("FlexAttention has no attention dropout", field=ENV,
                          hint=f"unset {ENV}, or set the model's attention_dropout to 0")
    if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        raise DpocliError("FlexAttention has no CPU backward: CPU training cannot use it",
                          field=ENV, hint=f"unset {ENV} (it serves CPU precompute and eval only)")
    n = query.shape[2]
    length = -(-n // BLOCK) * BLOCK
    if length != n:  # pad tokens form their own unit (see layout_tensors) and are cut off below
        pad = (0, 0, 0, length - n)
        query, key, value = (torch.nn.functional.pad(t, pad) for t in (query, key, value))
    block_mask = _block_mask(units, length, kwargs.get("sliding_window"), query.device)
    out = _flex_fn(query.device)(query, key, value, block_mask=block_mask, scale=scaling,
                                 enable_gqa=query.shape[1] != key.shape[1])
    return out[:, :, :n].transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------- the default kernel: per-sequence SDPA


def _window_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                 window: int | None) -> torch.Tensor:
    """[q, k] bool: key at or before the query and, with a sliding window, fewer than `window`
    positions back (transformers' `kv_idx > q_idx - sliding_window`)."""
    q, k = query_positions[:, None], key_positions[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return allowed


def check_supported(kwargs: dict) -> None:
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
    check_supported(kwargs)
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
    the name is chosen here, once (`packed_kernel`: per-sequence SDPA unless $DPOCLI_ATTN_KERNEL)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_kernel())
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds masks itself; packed calls ignore them
        pass
    else:
        AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    model.config._attn_implementation = PACKED_ATTENTION
