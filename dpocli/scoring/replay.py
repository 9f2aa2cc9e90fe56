"""Policy log-probs over cached pairs: the bridge from a cache (numpy) to model inputs (tensors).

Used by training (batches, periodic eval) and by `dpo eval`, so every consumer builds batches
and loss inputs from the cache the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np
import torch

from dpocli.cache.store import CacheData, Manifest
from dpocli.errors import DpocliError
from dpocli.model.batching import Batch, Batching, SharedPrefixBatch, make_batch, plan_reference_batches
from dpocli.model.logprobs import SequenceLogps, TokenStats, sequence_logps
from dpocli.model.packing import PackedBatch
from dpocli.scoring.vlm import VisionBatch


def cache_batch(data: CacheData, rows: Sequence[int], pad_id: int, prefix_sharing: bool = False,
                packing: bool = False) -> Batch | SharedPrefixBatch | PackedBatch | VisionBatch:
    """The rows' batch; of a vision-language cache (`vlm_scoring.attach`), with its pixel values."""
    batch = make_batch([data.row_list("prompt_ids", i) for i in rows],
                       [data.row_list("chosen_ids", i) for i in rows],
                       [data.row_list("rejected_ids", i) for i in rows], pad_id, prefix_sharing,
                       packing)
    return VisionBatch(batch, data.pixels(rows)) if data.pixels is not None else batch


@dataclass(frozen=True)
class RefLogps:
    """Cached reference values of a batch of pairs, each [B]: summed completion log-probs
    (float64) and completion token counts (long). What the loss compares the policy against."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor


def cached_reference(data: CacheData, rows: Sequence[int], device, ld_alpha: float | None = None) -> RefLogps:
    """The reference values of `rows`, as [B] tensors on `device`.

    ld_alpha: LD-DPO sums from the cached per-token log-probs (a `--token-logps` cache, see
    `check_token_logps`): Σ_{t<=ℓ} + α·Σ_{t>ℓ}, ℓ = min(|y_w|, |y_l|). TRL 1.16 applies `ld_alpha`
    to the reference as well as to the policy."""
    idx = list(rows)

    def pick(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(data.scalars[name][idx], dtype=dtype, device=device)
    chosen, rejected = pick("ref_chosen_logps", torch.float64), pick("ref_rejected_logps", torch.float64)
    if ld_alpha is not None:
        sums = [_ld_pair(data.row_list("ref_chosen_token_logps", i),
                         data.row_list("ref_rejected_token_logps", i), ld_alpha) for i in idx]
        chosen = torch.tensor([c for c, _ in sums], dtype=torch.float64, device=device)
        rejected = torch.tensor([r for _, r in sums], dtype=torch.float64, device=device)
    return RefLogps(chosen_logps=chosen, rejected_logps=rejected,
                    chosen_len=pick("chosen_len", torch.long), rejected_len=pick("rejected_len", torch.long))


def _ld_pair(chosen, rejected, alpha: float) -> tuple[float, float]:
    shared = min(len(chosen), len(rejected))
    return tuple(float(np.sum(t[:shared], dtype=np.float64) + alpha * np.sum(t[shared:], dtype=np.float64))
                 for t in (chosen, rejected))


def check_token_logps(flag: str, *caches: tuple) -> None:
    """Refuse (exit 2) an option that needs per-token reference log-probs when one of the
    (cache folder, CacheData) pairs lacks them."""
    for cache_dir, data in caches:
        if "ref_chosen_token_logps" not in data.lists:
            raise DpocliError(f"needs per-token reference log-probs, and the cache {cache_dir} has none",
                              field=flag,
                              hint="recreate the cache with `dpo precompute-ref ... --token-logps`")


def shard_batching(manifest: Manifest) -> dict[int, Batching]:
    """Shard index -> the batching precompute scored that shard with (layout from the spec,
    budget from the shard's own entry: a resumed run may have changed it)."""
    return {entry["index"]: Batching.from_records(manifest.spec.get("batching"), entry.get("budget"),
                                                  "manifest.json")
            for entry in manifest.shards}


def plan_like_precompute(data: CacheData, manifest: Manifest,
                         max_tokens: int | None = None) -> list[list[int]]:
    """Batches of cache rows grouped exactly as `precompute-ref` grouped them: the same planner
    over the same stored shards in stored order with each shard's recorded batching, so scoring
    the reference model reproduces the cached values bit for bit on the same hardware.
    `max_tokens` overrides the budget (faster, equal to ~1e-6).
    A derived cache (`dpo cache filter|split|merge`) records each shard's plan instead, whose
    negative members -(g + 1) are its replay-only rows: they run again and their results are
    dropped (`data.row_list` reads them). `max_tokens` plans the kept rows afresh.
    """
    batching = shard_batching(manifest)
    recorded = data.replay_plans
    batches = []
    for shard, rows in sorted(data.shard_rows().items()):
        if shard in recorded and max_tokens is None:
            base = data.ghost_base.get(shard, 0)
            batches += [[rows[m] if m >= 0 else m - base for m in batch] for batch in recorded[shard]]
            continue
        plan = plan_reference_batches([data.pair_lens(i) for i in rows],
                                      batching[shard].with_budget(max_tokens))
        batches += [[rows[p] for p in positions] for positions in plan]
    return batches


@torch.no_grad()
def score_cache(scorer, data: CacheData, manifest: Manifest, pad_id: int, device, *,
                max_tokens: int | None = None, dist=None, token_stats: bool = False,
                ld_alpha: float | None = None, router_aux: bool = False,
                only_rows: Collection[int] | None = None) -> SequenceLogps:
    """Policy summed log-probs (float64, CPU) of chosen and rejected for every cache row, in row
    order, with the cached completion lengths; `token_stats` and `ld_alpha` as in `sequence_logps`.
    router_aux: also the MoE router load-balancing loss, computed per forward batch (it is a
    statistic of a batch's tokens, not of a pair) and averaged over the batches weighted by their
    pairs, as HF's evaluation loop weights each batch's loss (`router_aux_loss`, a float64 scalar).

    With `dist`, ranks take every world_size-th batch and results are gathered on every rank.
    `only_rows`: score only precompute's batches that hold one of these rows, whole (so they
    replay exactly); the other rows' values stay 0 (`cache verify --rescore` samples this way).
    """
    # Per row: chosen, rejected sums, then (with token_stats) the chosen and rejected TokenStats
    # sums, then (with ld_alpha) the plain chosen sum.
    width = 2 + (8 if token_stats else 0) + (1 if ld_alpha is not None else 0)
    values = torch.zeros((data.num_rows, width), dtype=torch.float64)
    # Replay precompute's layout too, not only its batches (the layout is one per cache).
    layout = manifest.spec["batching"]
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    batches = plan_like_precompute(data, manifest, max_tokens)
    if only_rows is not None:
        wanted = set(only_rows)
        batches = [rows for rows in batches if wanted.intersection(rows)]
    mine_batches = batches[rank::world]
    # A sharded (FSDP) or DDP-wrapped model runs collectives in every forward, so all ranks
    # must run the same number of forwards: a rank short of work repeats a batch and drops it.
    rounds = -(-len(batches) // world)
    mine = []
    for b in range(rounds):
        rows = mine_batches[b] if b < len(mine_batches) else batches[0]
        batch = cache_batch(data, rows, pad_id, layout["prefix_sharing"], layout["packing"])
        out = sequence_logps(scorer, batch.to(device), token_stats=token_stats, ld_alpha=ld_alpha,
                             router_aux=router_aux)
        if b < len(mine_batches):
            aux = float(out.router_aux_loss) if router_aux else None
            mine.append((rows, _row_values(out).cpu(), aux))
    parts = dist.all_gather_object(mine) if dist is not None and dist.enabled else [mine]
    aux_sum = 0.0
    for part in parts:
        for rows, row_values, aux in part:
            kept = [k for k, row in enumerate(rows) if row >= 0]  # not a derived cache's replay-only rows
            values[[rows[k] for k in kept]] = row_values[kept]
            aux_sum += aux * len(kept) if router_aux else 0.0
    ref = cached_reference(data, range(data.num_rows), "cpu")
    stats = None
    if token_stats:  # back to per-segment [2N] vectors: chosen rows, then rejected rows
        stats = TokenStats(*(torch.cat([values[:, 2 + k], values[:, 6 + k]]) for k in range(4)))
    aux_mean = torch.tensor(aux_sum / max(data.num_rows, 1), dtype=torch.float64) if router_aux else None
    return SequenceLogps(values[:, 0], values[:, 1], ref.chosen_len, ref.rejected_len, stats=stats,
                         chosen_plain_logps=values[:, -1] if ld_alpha is not None else None,
                         router_aux_loss=aux_mean)


def _row_values(out: SequenceLogps) -> torch.Tensor:
    """[B, width] per pair: the columns `score_cache` collects."""
    b = out.chosen_logps.shape[0]
    cols = [out.chosen_logps, out.rejected_logps]
    if out.stats is not None:
        fields = (out.stats.entropy, out.stats.mean_logit, out.stats.top1, out.stats.wpo_logps)
        cols += [f[:b] for f in fields] + [f[b:] for f in fields]
    if out.chosen_plain_logps is not None:
        cols.append(out.chosen_plain_logps)
    return torch.stack([c.detach().double() for c in cols], dim=1)
