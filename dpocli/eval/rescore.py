"""`dpo cache verify --rescore N`: N sampled rows scored again by the reference model, through the
one scoring path (`dpo eval`'s exact replay), and compared with the cached values."""

from __future__ import annotations

import random
from pathlib import Path

from dpocli.cache import store as cache
from dpocli.data.hub import is_repo_id
from dpocli.errors import DpocliError
from dpocli.io.console import log, warn
from dpocli.model.devices import resolve_device
from dpocli.model.load import load_causal_lm, weights_fingerprint
from dpocli.model.logprobs import CompletionScorer
from dpocli.scoring.policy import STEP0_TOLERANCE
from dpocli.scoring.replay import score_cache
from dpocli.scoring.vlm import prepare_cache


def _reference(manifest: cache.Manifest, model: str | None, revision: str | None) -> tuple[str, str | None]:
    """(model, revision) to re-score with: the given --model, else the manifest's reference at the
    commit it was scored from (a hub id's branch may have moved since)."""
    if model is not None:
        return model, revision
    ref = manifest.spec["reference_model"]
    recorded = ref.get("revision") if is_repo_id(ref["path"]) and not Path(ref["path"]).exists() else None
    return ref["path"], revision or recorded


def rescore_sample(
    cache_dir: str,
    manifest: cache.Manifest,
    data,
    rescore: int,
    model: str | None,
    model_revision: str | None,
    seed: int,
    device: str | None,
    trust_remote_code: bool,
) -> dict:

    path, revision = _checked_reference(manifest, model, model_revision)
    dtype = manifest.spec["dtype"]
    dev = resolve_device(device)
    scorer = CompletionScorer(
        load_causal_lm(path, dtype=dtype, device=dev, revision=revision, trust_remote_code=trust_remote_code)
    )
    prepare_cache(cache_dir, manifest, data)  # a vision-language cache: pixel values per batch
    rows = sorted(random.Random(seed).sample(range(data.num_rows), min(rescore, data.num_rows)))
    pad_id = int(manifest.spec["tokenizer"]["pad_token_id"])
    # The one scoring path: the sampled rows' batches replayed whole, with precompute's plan and
    # layout (as `dpo eval` replays them), so on the same hardware the values come back bit for bit.
    scored = score_cache(scorer, data, manifest, pad_id, dev, only_rows=rows)
    worst, worst_row = 0.0, None
    for i in rows:
        for value, name in ((scored.chosen_logps[i], "ref_chosen_logps"),
                            (scored.rejected_logps[i], "ref_rejected_logps")):
            diff = abs(float(value) - float(data.scalars[name][i]))
            if diff > worst or worst_row is None:
                worst, worst_row = max(diff, worst), (i, name)
    # Exact is expected; other hardware or library releases than precompute's move values at the
    # rounding level, which the step-0 check's tolerance for the dtype still accepts, with a warning.
    tolerance = {**STEP0_TOLERANCE, "float32": 1e-4}[dtype]
    log(f"re-scored {len(rows)} rows: max |cached - recomputed| = {worst:.3g}")
    if worst > tolerance:
        i, name = worst_row
        raise DpocliError(
            f"differs from the reference model's value by {worst:.3g} (> {tolerance:g})",
            file=cache_dir,
            row=int(data.source_row[i]) + 1,
            field=name,
            hint="the cache is stale or corrupt; recreate it with precompute-ref",
        )
    if worst > 0:
        warn(f"re-scored values are not bit-identical (max diff {worst:.3g}, within {tolerance:g}): "
             "other hardware, thread count or library releases than precompute's")
    return {"rescored_rows": len(rows), "rescore_max_abs_diff": worst, "rescore_exact": worst == 0.0,
            "rescore_tolerance": tolerance}


def _checked_reference(manifest: cache.Manifest, model: str | None, revision: str | None):
    """(path, revision) of the reference to re-score with, after checking that its weights hash
    to the manifest's fingerprint (the cache says exactly which weights made it)."""

    ref = manifest.spec["reference_model"]
    path, revision = _reference(manifest, model, revision)
    try:
        found = weights_fingerprint(path, revision, mode=ref.get("fingerprint", "full"))["sha256"]
    except DpocliError as err:
        if model:
            raise
        raise DpocliError(
            f"the cache's reference model {path} cannot be found ({err.message})",
            field="--model",
            hint="pass --model with the reference the cache was made with",
        ) from None
    if found != ref["sha256"]:
        raise DpocliError(
            f"weights differ from the cache's reference (sha256 {found[:12]} vs {ref['sha256'][:12]})",
            file=path,
            field="reference_model.sha256",
            hint="pass --model with the exact reference the cache was made with",
        )
    return path, revision
