"""Throughput and peak memory of `dpo cache audit` and `dpo cache filter` (issue 26), against a plain
pyarrow scan of the same columns, on a synthetic cache and on a cut of its first rows.

    PYTHONPATH=. python bench/cache_ops.py --rows 2000000 --cut 100000 [--workdir DIR] [--keep]

Builds two caches with numpy (no model; random token ids, written shard by shard with dpocli's own
shard writer and manifest, 4096 rows a shard as precompute's default): ROWS pairs, and the first
CUT of the same rows. About 1% of pairs have chosen == rejected, 0.5% repeat the previous pair and
0.5% are the previous pair swapped, so every code path of audit and filter does work.
Each measurement runs in a fresh interpreter, which prints the wall time of the work (after its
imports) and its own peak RSS (`ru_maxrss`, imports included): `scan` decodes the audit's columns with pyarrow, record batch by
record batch, and does nothing else; `audit` is
`cache_audit.run_audit`; `filter` is `cache_ops.run_filter` with --dedupe --drop-identical
--drop-conflicting --min-ref-margin -30 (both passes: deciding and writing). Prints one JSON
object; bench/RESULTS.md ("The cache as a dataset") quotes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpocli.cache import store as cache  # noqa: E402
from dpocli.cache.manifest import tokenizer_file_hashes  # noqa: E402

ROWS_PER_SHARD = 4096
SPEC = {
    "conventions": "trl-1.x", "reference_model": {"path": "synthetic", "revision": None, "sha256": "0" * 64},
    "tokenizer": {"fingerprint": "synthetic", "eos_token": "</s>", "pad_token_id": 0},
    "max_length": 64, "truncation": "keep_start", "dtype": "float32", "attn_implementation": "default",
    "token_logps": False, "batching": {"rows_per_shard": ROWS_PER_SHARD, "packing": False, "prefix_sharing": False},
    "input": {"files": [{"path": "bench/cache_ops.py"}], "columns": {}, "drop_identical": False,
              "dropped_on_read": {}},
}
BUDGET = {"batch_size": None, "max_tokens": 16384}


def _lists(rng, lengths: np.ndarray) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(3, 32000, offsets[-1], dtype=np.int32)))


def _shard_columns(rng, start: int, n: int) -> dict:
    p_len, c_len, r_len = rng.integers(4, 33, n), rng.integers(1, 17, n), rng.integers(1, 17, n)
    prompt, chosen, rejected = _lists(rng, p_len), _lists(rng, c_len), _lists(rng, r_len)
    ref_c, ref_r = -rng.gamma(2.0, 4.0, n), -rng.gamma(2.0, 4.0, n)
    rows = {"prompt": prompt.to_pylist(), "chosen": chosen.to_pylist(), "rejected": rejected.to_pylist()}
    kind = rng.random(n)
    for i in range(1, n):  # a few identical, duplicated and swapped pairs
        if kind[i] < 0.01:
            rows["rejected"][i] = rows["chosen"][i]
        elif kind[i] < 0.015:
            for k in rows:
                rows[k][i] = rows[k][i - 1]
        elif kind[i] < 0.02:
            rows["prompt"][i] = rows["prompt"][i - 1]
            rows["chosen"][i], rows["rejected"][i] = rows["rejected"][i - 1], rows["chosen"][i - 1]
    ids = pa.array([f"row-{start + i:08d}" for i in range(n)])
    lists = {k: pa.array(v, pa.list_(pa.int32())) for k, v in rows.items()}
    return {"id": ids, "source_row": pa.array(np.arange(start, start + n)), "prompt_ids": lists["prompt"],
            "chosen_ids": lists["chosen"], "rejected_ids": lists["rejected"],
            "chosen_len": pa.array([len(x) for x in rows["chosen"]], pa.int32()),
            "rejected_len": pa.array([len(x) for x in rows["rejected"]], pa.int32()),
            "ref_chosen_logps": pa.array(ref_c), "ref_rejected_logps": pa.array(ref_r)}


def build(out: Path, rows: int, seed: int = 0) -> Path:
    """A complete cache of `rows` synthetic pairs; the first k rows are the same for every `rows`."""
    out.mkdir(parents=True)
    (out / cache.TOKENIZER_DIR).mkdir()
    (out / cache.TOKENIZER_DIR / "tokenizer.json").write_text("{}")
    shards = []
    for index, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        n = min(ROWS_PER_SHARD, rows - start)
        columns = _shard_columns(np.random.default_rng([seed, index]), start, n)
        entry = cache.write_shard(out, index, columns, False, SPEC)
        shards.append({**entry, "dropped": {}, "budget": BUDGET, "tokens": 0})
    manifest = cache.Manifest(SPEC, planned_shards=len(shards), rows_read=rows, shards=shards, complete=True,
                              tokenizer_files=tokenizer_file_hashes(out / cache.TOKENIZER_DIR))
    cache.commit_manifest(out, manifest)
    return out


PROBE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
{setup}
t0 = time.perf_counter()  # after the imports: start-up is bench/startup.py's business
{body}
print(json.dumps({{"seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
BODIES = {
    "scan": """
from dpocli.cache import scan as cache_scan
#
m = cache_scan.open_cache({cache!r}, checksums=False)
rows = 0
for entry, batch in cache_scan.iter_shards({cache!r}, m, cache_scan.AUDIT_COLUMNS):
    rows += batch.num_rows  # decoded into Arrow buffers: what every command starts from
""",
    "audit": """
from dpocli.cache.audit import run_audit
#
run_audit({cache!r})
""",
    "filter": """
from dpocli.cache.ops import run_filter
#
run_filter({cache!r}, {out!r}, dedupe=True, drop_identical=True, drop_conflicting=True, min_ref_margin=-30.0,
           overwrite=True)
""",
}


def measure(kind: str, cache_dir: Path, out: Path) -> dict:
    setup, body = BODIES[kind].format(cache=str(cache_dir), out=str(out)).split("\n#\n")
    done = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), setup=setup, body=body)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cut", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the caches (and reuse them next time)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dpocli-bench-cache-ops-"))
    result = {"rows": args.rows, "cut": args.cut, "rows_per_shard": ROWS_PER_SHARD}
    try:
        for label, n in (("cut", args.cut), ("whole", args.rows)):
            cache_dir = work / f"cache-{n}"
            if not (cache_dir / cache.MANIFEST_NAME).exists():
                t0 = time.perf_counter()
                build(cache_dir, n)
                print(f"built {n} rows in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            mb = sum(p.stat().st_size for p in cache_dir.iterdir() if p.is_file()) / 1e6
            entry = {"rows": n, "mb_on_disk": round(mb, 1)}
            for kind in ("scan", "audit", "filter"):
                m = measure(kind, cache_dir, work / f"filtered-{n}")
                entry[kind] = {"seconds": round(m["seconds"], 2), "rows_per_s": round(n / m["seconds"]),
                               "peak_rss_mb": round(m["peak_rss_mb"], 1)}
                print(f"{label} {kind}: {entry[kind]}", file=sys.stderr)
            result[label] = entry
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    whole, cut = result["whole"], result["cut"]
    result["ratios"] = {f"{kind}_rss_whole_over_cut": round(whole[kind]["peak_rss_mb"] / cut[kind]["peak_rss_mb"], 3)
                        for kind in ("scan", "audit", "filter")}
    result["ratios"].update({f"scan_over_{kind}_throughput_whole": round(
        whole["scan"]["rows_per_s"] / whole[kind]["rows_per_s"], 2) for kind in ("audit", "filter")})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
