"""One copy of the reference cache per node: the local ranks memory-map it instead of each loading it.

`cache.load_cache` gives a process the whole cache in its own memory, about 4 bytes per token: with
8 ranks per node, 1M pairs and 500 tokens per pair that is 8 x 2.1 GB of host RAM. Here, under
torchrun with more than one rank on the node, local rank 0 loads and checks the cache exactly as
one process does, writes its rows once to an uncompressed Arrow file in TMPDIR
(`cache.spill_cache`), and every rank of the node maps that file (`cache.map_cache`). The file's
pages sit once in the page cache, shared by the node's ranks (and, being clean, evictable under
memory pressure); a rank's private memory keeps only the row ids as Python strings. When every
local rank has mapped the file, local rank 0 unlinks it: the mappings stay valid (POSIX), so
nothing is left on disk once loading is done.

The values are the same bytes on either path, so training and eval results are bit-identical.

Assumptions:
* torchrun numbers the ranks of a node contiguously, so a rank's local rank 0 is `rank - local_rank`
  (torchrun's own rule); LOCAL_WORLD_SIZE is set by torchrun.
* TMPDIR is on a local filesystem with room for the uncompressed rows (about 4 bytes per token and
  40 per row); if not, set TMPDIR, or DPOCLI_CACHE_MMAP=0 to load privately as before.
* A single process gains nothing (there is nobody to share with) and keeps the private load, unless
  DPOCLI_CACHE_MMAP=1 forces the mapped path (the tests do, to prove the values equal). A crash of
  local rank 0 between writing and unlinking can leave a `dpocli-cache-<pid>-*.arrow` in TMPDIR.
"""

from __future__ import annotations

import os
from pathlib import Path

from dpocli.cache import store as cache
from dpocli.errors import DpocliError
from dpocli.model import distributed

ENV = "DPOCLI_CACHE_MMAP"  # "1": always map, "0": never, unset: map when a node runs several ranks


def maps_cache(dist: distributed.DistContext) -> bool:
    """Whether this process should map the cache (see the module docstring for the rule)."""
    forced = os.environ.get(ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    return dist.enabled and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1


def load_cache(cache_dir: str | Path, *, checksums: bool = True,
               dist: distributed.DistContext | None = None) -> tuple[cache.Manifest, cache.CacheData]:
    """`cache.load_cache`, with the rows memory-mapped and shared by the node's ranks when
    `maps_cache` says so. A collective under torchrun: every rank calls it, and a `DpocliError`
    (a refused cache, a full TMPDIR) is raised on every rank."""
    dist = dist or distributed.current()
    if not maps_cache(dist):
        return cache.load_cache(cache_dir, checksums=checksums)
    writer = dist.local_rank == 0
    try:
        verdict = ("ok", _spill(cache_dir, checksums)) if writer else ("ok", None)
    except DpocliError as err:
        verdict = ("error", err)
    verdicts = dist.all_gather_object(verdict)
    errors = [v for status, v in verdicts if status == "error"]
    if errors:
        raise errors[0]
    manifest, path = verdicts[dist.rank - dist.local_rank][1]
    try:
        data = cache.read_replay(cache_dir, manifest, cache.map_cache(path))
    finally:
        dist.barrier()  # every local rank has mapped the file: it can go
        if writer:
            path.unlink(missing_ok=True)
    return manifest, data


def _spill(cache_dir, checksums: bool) -> tuple[cache.Manifest, Path]:
    manifest, data = cache.load_cache(cache_dir, checksums=checksums)
    try:
        path = cache.spill_cache(data)
    except OSError as err:
        raise DpocliError(f"cannot hold the memory-mapped copy of the cache ({err.strerror})",
                          file=getattr(err, "filename", None) or os.environ.get("TMPDIR", "/tmp"),
                          hint=f"set TMPDIR to a local folder with room for it, or {ENV}=0") from None
    del data  # the private copy goes, and its pages back to the system: this rank keeps the map
    cache.release_freed_memory()
    return manifest, path
