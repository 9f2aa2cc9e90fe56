"""The drivers of `dpo cache filter`, `split` and `merge`: check every argument and output, decide
the rows (cache_select.py), write the derived cache(s) (cache_derive.py), return the summary.

Order of work, as everywhere in dpocli: every check (values, inputs, outputs) before anything is
written; then one streaming pass to decide, one to write.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dpocli import __version__
from dpocli.cache import derive as cache_derive
from dpocli.cache import scan as cache_scan
from dpocli.cache import select as cache_select
from dpocli.cache import store as cache
from dpocli.errors import DpocliError, check_seed
from dpocli.io.console import log

# Spec fields merged caches may differ in: what was read, and how each was derived.
MERGE_FREE = ("input", "derived")


def _open(cache_dir: str) -> cache.Manifest:
    return cache_scan.open_cache(cache_dir, checksums=True)  # a derived cache vouches for its rows


def _dropped(codes: np.ndarray) -> dict[str, int]:
    reasons, counts = np.unique(codes[codes > 0], return_counts=True)
    return {cache_select.REASONS[int(k) - 1]: int(n) for k, n in zip(reasons, counts)}


def _summary(
    command: str, out: Path, manifest: cache.Manifest, rows_in: int, codes: np.ndarray, replay_rows: int
) -> dict:
    return {
        "command": command,
        "dpocli_version": __version__,
        "cache": str(out),
        "spec_fingerprint": manifest.spec_fingerprint,
        "rows_in": rows_in,
        "rows_written": manifest.rows_written,
        "rows_dropped": _dropped(codes),
        "shards": len(manifest.shards),
        "replay_rows": replay_rows,
    }


def _replay_rows(manifest: cache.Manifest) -> int:
    return sum((e.get("replay") or {}).get("rows", 0) for e in manifest.shards)


def run_filter(cache_dir: str, out: str, *, overwrite: bool = False, **rule) -> dict:
    """`dpo cache filter`; `rule`: cache_select.FilterRule's fields."""
    t0 = time.perf_counter()
    rule = cache_select.FilterRule(**rule)
    rule.check()
    out_path = Path(out)
    manifest = _open(cache_dir)
    cache_derive.check_out(out_path, {"CACHE": cache_dir}, overwrite)
    codes = cache_select.filter_codes(cache_dir, manifest, rule)
    spec = cache_derive.derived_spec(
        manifest.spec, {"operation": "filter", "filter": rule.record()}, [(cache_dir, manifest)]
    )
    written = cache_derive.write_derived(out_path, spec, [(cache_dir, manifest, codes, 0)], "cache filter")
    log(f"kept {written.rows_written} of {codes.size} rows -> {out_path}")
    summary = _summary("cache filter", out_path, written, int(codes.size), codes, _replay_rows(written))
    return {**summary, "parent": str(cache_dir), "seconds": round(time.perf_counter() - t0, 3)}


def run_split(
    cache_dir: str,
    out_train: str,
    out_test: str,
    *,
    test_size: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    t0 = time.perf_counter()
    check_seed(seed)
    if not 0 < test_size < 1:
        raise DpocliError(f"must be between 0 and 1 (exclusive), got {test_size}", field="--test-size")
    train_path, test_path = Path(out_train), Path(out_test)
    a, b = train_path.expanduser().resolve(), test_path.expanduser().resolve()
    if a == b or a in b.parents or b in a.parents:
        raise DpocliError("is, holds or lies inside --out-test; the two caches need folders of their own",
                          file=out_train, field="--out-train")
    manifest = _open(cache_dir)
    cache_derive.check_out(train_path, {"CACHE": cache_dir, "--out-test": out_test}, overwrite, "--out-train")
    cache_derive.check_out(test_path, {"CACHE": cache_dir, "--out-train": out_train}, overwrite, "--out-test")
    to_test = cache_select.split_codes(cache_dir, manifest, test_size, seed).astype(bool)
    sides = {}
    for side, path, codes in (
        ("train", train_path, np.where(to_test, cache_select.CODE["split_test"], 0).astype(np.uint8)),
        ("test", test_path, np.where(to_test, 0, cache_select.CODE["split_train"]).astype(np.uint8)),
    ):
        operation = {"operation": "split", "side": side, "test_size": test_size, "seed": seed}
        spec = cache_derive.derived_spec(manifest.spec, operation, [(cache_dir, manifest)])
        written = cache_derive.write_derived(path, spec, [(cache_dir, manifest, codes, 0)], "cache split")
        sides[side] = _summary("cache split", path, written, int(codes.size), codes, _replay_rows(written))
    log(
        f"{sides['train']['rows_written']} rows -> {train_path}, "
        f"{sides['test']['rows_written']} -> {test_path}"
    )
    return {
        "command": "cache split",
        "dpocli_version": __version__,
        "parent": str(cache_dir),
        "test_size": test_size,
        "seed": seed,
        "train": sides["train"],
        "test": sides["test"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _check_mergeable(caches: list[str], manifests: list[cache.Manifest]) -> None:
    first = {k: v for k, v in manifests[0].spec.items() if k not in MERGE_FREE}
    for cache_dir, manifest in zip(caches[1:], manifests[1:]):
        other = {k: v for k, v in manifest.spec.items() if k not in MERGE_FREE}
        differs = cache.explain_mismatch(first, other)
        if differs:
            field = differs.split(":")[0]
            raise DpocliError(
                f"was made differently from {caches[0]} ({differs.replace('run expects', 'first has')}); "
                "only caches of the same reference, tokenizer and settings merge",
                file=cache_dir,
                field=field,
            )


def _merged_spec(manifests: list[cache.Manifest]) -> dict:
    base = dict(manifests[0].spec)
    dropped: dict[str, int] = {}
    for m in manifests:
        for reason, n in m.spec["input"].get("dropped_on_read", {}).items():
            dropped[reason] = dropped.get(reason, 0) + n
    base["input"] = {
        **base["input"],
        "files": [f for m in manifests for f in m.spec["input"]["files"]],
        "dropped_on_read": dropped,
    }
    return base


def _source_offsets(caches: list[str], manifests: list[cache.Manifest]) -> list[int]:
    """Per cache, what its source_row is shifted by, so the merged rows keep one increasing order
    (the first cache's rows, then the second's, ...)."""
    offsets, next_offset = [], 0
    for cache_dir, manifest in zip(caches, manifests):
        offsets.append(next_offset)
        top = -1
        for _, batch in cache_scan.iter_shards(cache_dir, manifest, ["source_row"]):
            if batch.num_rows:
                top = max(top, int(np.max(batch.column(0).to_numpy())))
        next_offset += top + 1
    return offsets


def run_merge(caches: list[str], out: str, *, overwrite: bool = False) -> dict:
    t0 = time.perf_counter()
    if len(caches) < 2:
        raise DpocliError(f"needs at least two caches to merge, got {len(caches)}", field="CACHES")
    out_path = Path(out)
    manifests = [_open(c) for c in caches]
    _check_mergeable(caches, manifests)
    cache_derive.check_out(out_path, {f"CACHE {c}": c for c in caches}, overwrite)
    codes, duplicates = cache_select.merge_codes(list(zip(caches, manifests)))
    offsets = _source_offsets(caches, manifests)
    spec = cache_derive.derived_spec(
        _merged_spec(manifests), {"operation": "merge"}, list(zip(caches, manifests))
    )
    parts = [(c, m, k, o) for c, m, k, o in zip(caches, manifests, codes, offsets)]
    written = cache_derive.write_derived(out_path, spec, parts, "cache merge")
    if duplicates["duplicate_ids"]:
        d = duplicates
        log(f"{d['duplicate_ids']} rows repeat an id of an earlier row ({d['same_pair']} the same pair, "
            f"{d['different_pair']} another pair); each id kept once, its first row")
    all_codes = np.concatenate(codes)
    summary = _summary(
        "cache merge", out_path, written, int(all_codes.size), all_codes, _replay_rows(written)
    )
    return {
        **summary,
        "parents": list(caches),
        "duplicates": duplicates,
        "seconds": round(time.perf_counter() - t0, 3),
    }
