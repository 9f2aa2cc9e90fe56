"""`dpo cache verify`: prove a cache still is what its manifest says.

Checks, cheapest first: the manifest's own checksum and format version, every shard's row count
and sha256, the sha256 of every file in `tokenizer/` (a replaced tokenizer would ship with
checkpoints), finite reference values, and (with `rescore`) a random sample of rows re-scored
with the reference model, whose weights must hash to the manifest's fingerprint.
All but the re-scoring are `cache.load_cache`'s checks, the same that train and eval run.
"""

from __future__ import annotations

import random
import time

import torch

from dpocli import __version__, cache
from dpocli.console import log
from dpocli.errors import DpocliError, check_at_least, check_seed
from dpocli.logprobs import CompletionScorer
from dpocli.modeling import load_causal_lm, resolve_device, weights_fingerprint
from dpocli.policy import STEP0_TOLERANCE
from dpocli.scoring import cache_batch

# Re-scored rows run in other batches than precompute used, so they agree to fp rounding only.
RESCORE_TOLERANCE = {"float32": 1e-4, **{k: v for k, v in STEP0_TOLERANCE.items() if k != "float32"}}


def run_verify(cache_dir: str, *, rescore: int = 0, model: str | None = None, seed: int = 0,
               device: str | None = None) -> dict:
    t0 = time.perf_counter()
    check_at_least({"--rescore": rescore}, 0)
    check_seed(seed)
    manifest, data = cache.load_cache(cache_dir, checksums=True)
    result = {"command": "cache verify", "dpocli_version": __version__, "cache": str(cache_dir),
              "spec_fingerprint": manifest.spec_fingerprint, "shards_checked": len(manifest.shards),
              "rows": data.num_rows, "checksums": "ok", "values_finite": "ok",
              "tokenizer_files_checked": len(manifest.tokenizer_files)}
    if rescore > 0:
        ref = manifest.spec["reference_model"]
        path = model or ref["path"]
        try:
            found = weights_fingerprint(path, ref.get("fingerprint", "full"))["sha256"]
        except DpocliError as err:
            if model:
                raise
            raise DpocliError(f"the cache's reference model {path} cannot be found ({err.message})",
                              field="--model", hint="pass --model with the reference the cache was "
                                                    "made with") from None
        if found != ref["sha256"]:
            raise DpocliError(f"weights differ from the cache's reference (sha256 {found[:12]} vs "
                              f"{ref['sha256'][:12]})", file=path, field="reference_model.sha256",
                              hint="pass --model with the exact reference the cache was made with")
        dtype = manifest.spec["dtype"]
        dev = resolve_device(device)
        scorer = CompletionScorer(load_causal_lm(path, dtype=dtype, device=dev))
        rows = sorted(random.Random(seed).sample(range(data.num_rows), min(rescore, data.num_rows)))
        pad_id = int(manifest.spec["tokenizer"]["pad_token_id"])
        worst, worst_row = 0.0, None
        with torch.inference_mode():
            for start in range(0, len(rows), 8):
                chunk = rows[start:start + 8]
                batch = cache_batch(data, chunk, pad_id).to(dev)
                sums, _ = scorer(batch.model_inputs())
                b = len(chunk)
                for j, i in enumerate(chunk):
                    for value, name in ((sums[j], "ref_chosen_logps"), (sums[b + j], "ref_rejected_logps")):
                        diff = abs(float(value) - float(data.scalars[name][i]))
                        if diff > worst:
                            worst, worst_row = diff, (i, name)
        tolerance = RESCORE_TOLERANCE[dtype]
        result.update({"rescored_rows": len(rows), "rescore_max_abs_diff": worst,
                       "rescore_tolerance": tolerance})
        log(f"re-scored {len(rows)} rows: max |cached - recomputed| = {worst:.3g}")
        if worst > tolerance:
            i, name = worst_row
            raise DpocliError(f"differs from the reference model's value by {worst:.3g} (> {tolerance:g})",
                              file=cache_dir, row=int(data.source_row[i]) + 1, field=name,
                              hint="the cache is stale or corrupt; recreate it with precompute-ref")
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
