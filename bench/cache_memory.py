"""Bytes per cached token that each rank holds for a loaded cache, private and shared, with and
without the memory-mapped path (dpocli/scoring/shared_cache.py).

    PYTHONPATH=. python bench/cache_memory.py --pairs 20000 --tokens 500 [--nproc 2]

Builds a synthetic cache (random token ids, written shard by shard as precompute writes them; no
model), then loads it under `torchrun --nproc-per-node NPROC` twice, with DPOCLI_CACHE_MMAP=0 (each
rank loads privately: dpocli before issue 15 item 4) and =1 (one copy per node, mapped). Each rank
reads /proc/self/smaps_rollup before and after `shared_cache.load_cache`, having touched every
page of the arrays (as an epoch does) and returned freed memory to the system on both paths:
  private  = growth of `Anonymous` (memory of this process alone, never shared nor evictable)
  shared   = growth of `Pss_File` + `Pss_Shmem` (this rank's share of mapped pages)
  rss      = growth of `Rss` (private + every mapped page, counted in full)
each divided by the cache's token count (prompt + chosen + rejected ids). Prints one JSON object:
{"tokens", "mb_on_disk", "private_load": [per rank], "mapped": [per rank]}; with --before
CHECKOUT also "before": the same for another dpocli checkout (e.g. main before this change).
tests/test_shared_cache.py runs the small version and asserts the private figure drops.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "sample_data" / "tiny-llama"
# A cache spec with every field a real one has (the manifest schema requires them), marked synthetic.
SPEC = {"synthetic": "bench/cache_memory.py", "conventions": "trl-1.x", "token_logps": False,
        "reference_model": {"path": "synthetic", "revision": None, "sha256": "0" * 64},
        "tokenizer": {"fingerprint": "0" * 64, "eos_token": None, "pad_token_id": 0},
        "max_length": 1024, "truncation": "keep_start", "dtype": "float32", "attn_implementation": "default",
        "batching": {"rows_per_shard": 4096, "packing": False, "prefix_sharing": False},
        "input": {"files": [], "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                                           "id": None}, "drop_identical": False, "dropped_on_read": {}}}
BUDGET = {"batch_size": None, "max_tokens": 16384}
ROWS_PER_SHARD = 4096


def build_cache(out: Path, pairs: int, tokens: int, seed: int = 0) -> int:
    """A complete cache of `pairs` random rows of about `tokens` ids each (40% prompt, 30% chosen,
    30% rejected, lengths jittered); returns the number of ids stored."""
    import pyarrow as pa

    from dpocli.cache import store as cache
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    manifest = cache.Manifest(spec=SPEC, planned_shards=-(-pairs // ROWS_PER_SHARD), rows_read=pairs)
    total = 0
    for index, start in enumerate(range(0, pairs, ROWS_PER_SHARD)):
        n = min(ROWS_PER_SHARD, pairs - start)
        lens = {name: rng.integers(max(1, int(tokens * share * 0.8)), int(tokens * share * 1.2) + 2, n)
                for name, share in (("prompt_ids", 0.4), ("chosen_ids", 0.3), ("rejected_ids", 0.3))}
        columns = {"id": [f"pair-{start + i:08d}" for i in range(n)],
                   "source_row": np.arange(start, start + n, dtype=np.int64),
                   "chosen_len": lens["chosen_ids"].astype(np.int32),
                   "rejected_len": lens["rejected_ids"].astype(np.int32),
                   "ref_chosen_logps": -rng.random(n) * 100, "ref_rejected_logps": -rng.random(n) * 100}
        for name, length in lens.items():
            offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int32)
            values = rng.integers(3, 1445, int(offsets[-1]), dtype=np.int32)
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
            total += int(offsets[-1])
        manifest.shards.append({**cache.write_shard(out, index, columns, False, SPEC), "dropped": {},
                                "budget": BUDGET})
    folder = out / cache.TOKENIZER_DIR
    folder.mkdir()
    shutil.copy(TINY / "tokenizer.json", folder / "tokenizer.json")
    manifest.tokenizer_files = cache.tokenizer_file_hashes(folder)
    manifest.complete = True
    cache.commit_manifest(out, manifest)
    return total


def smaps() -> dict[str, int]:
    """Bytes by field of /proc/self/smaps_rollup."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name] = int(value.split()[0]) * 1024
    return fields


def probe(cache_dir: Path) -> None:
    """Under torchrun: load the cache on every rank, measure, and print the ranks' figures (rank 0)."""
    import pyarrow as pa

    from dpocli.cache import store as cache
    from dpocli.model import distributed
    try:
        from dpocli.scoring.shared_cache import load_cache
    except ImportError:  # a checkout before issue 15 item 4 (--dpocli): every rank loads privately
        load_cache = cache.load_cache
    dist = distributed.current()
    gc.collect()
    before = smaps()
    _, data = load_cache(cache_dir, **({"dist": dist} if load_cache is not cache.load_cache else {}))
    touched = sum(int(a.sum(dtype=np.float64)) for pair in data.lists.values() for a in pair)
    touched += sum(int(a.sum()) for a in data.scalars.values())
    gc.collect()
    pa.default_memory_pool().release_unused()
    dist.barrier()  # every rank has mapped and touched the pages before anyone counts them
    after = smaps()
    grow = {k: after[k] - before[k] for k in after}
    mine = {"rank": dist.rank, "private": grow["Anonymous"], "shared": grow["Pss_File"] + grow["Pss_Shmem"],
            "rss": grow["Rss"], "touched": touched}
    everyone = dist.all_gather_object(mine)
    if dist.is_main:
        print(json.dumps(everyone))
    distributed.shutdown()


def measure(cache_dir: Path, nproc: int, mapped: bool, dpocli: Path = ROOT) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(dpocli),
           "DPOCLI_CACHE_MMAP": "1" if mapped else "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, "--probe", str(cache_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_token(ranks: list[dict], tokens: int) -> list[dict]:
    return [{"rank": r["rank"], **{k: round(r[k] / tokens, 3) for k in ("private", "shared", "rss")}}
            for r in ranks]


def run(pairs: int, tokens: int, nproc: int, folder: Path, before: Path | None = None) -> dict:
    stored = build_cache(folder / "cache", pairs, tokens)
    on_disk = sum(p.stat().st_size for p in (folder / "cache").glob("part-*.parquet"))
    result = {"pairs": pairs, "tokens": stored, "tokens_per_pair": round(stored / pairs, 1),
              "mb_on_disk": round(on_disk / 2**20, 1), "nproc": nproc}
    runs = [("private_load", False, ROOT), ("mapped", True, ROOT)]
    if before:
        runs.insert(0, ("before", False, before))
    for name, mapped, dpocli in runs:
        ranks = measure(folder / "cache", nproc, mapped, dpocli)
        assert len({r["touched"] for r in ranks}) == 1  # every rank saw the same values
        result[name] = per_token(ranks, stored)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--tokens", type=int, default=500, help="ids per pair (prompt+chosen+rejected)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--before", type=Path, help="also measure the dpocli checkout in this folder")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # the per-rank half, under torchrun
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(args.pairs, args.tokens, args.nproc, Path(tmp), args.before)))


if __name__ == "__main__":
    main()
