"""`dpo cache verify`: prove a cache still is what its manifest says.

Checks, cheapest first: the manifest's own checksum and format version, every shard's row count
and sha256, the sha256 of every file in `tokenizer/` (a replaced tokenizer would ship with
checkpoints), finite reference values, and (with `rescore`) a random sample of rows re-scored
with the reference model, whose weights must hash to the manifest's fingerprint.
All but the re-scoring are `cache.load_cache`'s checks, the same that train and eval run.
"""

from __future__ import annotations

import time

from dpocli import __version__
from dpocli.cache import store as cache
from dpocli.errors import check_at_least, check_seed

# torch, transformers and the scorer (rescore.py) are imported only to re-score: without --rescore
# this command reads Parquet and JSON only, so it answers in well under a second in shell
# pipelines. That one import inside a function is the driver's lazy import (test_architecture).


def run_verify(
    cache_dir: str,
    *,
    rescore: int = 0,
    model: str | None = None,
    seed: int = 0,
    device: str | None = None,
    trust_remote_code: bool = False,
    model_revision: str | None = None,
) -> dict:
    t0 = time.perf_counter()
    check_at_least({"--rescore": rescore}, 0)
    check_seed(seed)
    manifest, data = cache.load_cache(cache_dir, checksums=True)
    result = {
        "command": "cache verify",
        "dpocli_version": __version__,
        "cache": str(cache_dir),
        "spec_fingerprint": manifest.spec_fingerprint,
        "shards_checked": len(manifest.shards),
        "rows": data.num_rows,
        "checksums": "ok",
        "values_finite": "ok",
        "tokenizer_files_checked": len(manifest.tokenizer_files),
    }
    if rescore > 0:
        from dpocli.eval.rescore import rescore_sample

        result.update(
            rescore_sample(
                cache_dir, manifest, data, rescore, model, model_revision, seed, device, trust_remote_code
            )
        )
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
