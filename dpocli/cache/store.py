"""The reference cache on disk: Parquet shards plus a manifest that is the commit record.

Layout of a cache folder:
    manifest.json            what produced the numbers (the `spec`), row counts, finished shards
    part-00000.parquet ...   rows; each shard also carries the spec in its key-value metadata
    tokenizer/               the tokenizer that produced the ids (so a checkpoint can ship it);
                             the manifest lists each of its files with a sha256

Invariants:
* A shard file is written under a temporary name and renamed; it is listed in the manifest (with
  its sha256) only after the rename, and the manifest itself is rewritten atomically. So a crash
  leaves either a shard that is listed and complete, or one that is ignored and redone.
* `complete` is set only when every planned shard is listed; readers refuse incomplete caches.
* `spec` holds every input that changes the numbers, the batch layout included (`dpo eval`
  replays it); each shard entry records the batch budget it was scored with. `spec_fingerprint`
  hashes the spec, and `manifest_sha256` hashes the whole manifest so a hand edit is detected.
* Every file of `tokenizer/` is listed with its sha256 (`tokenizer_files`), so a replaced
  tokenizer is refused by `load_cache` instead of shipping with checkpoints or decoding samples.

Format versions: 2 added `spec.batching`, `shards[].budget` and `tokenizer_files`. Version 1
caches are refused (recreate them): they cannot prove their tokenizer folder, and a resumed v1
run may have mixed batch plans that `dpo eval` could not replay.

The manifest and the checks that need no Parquet reader are in manifest.py.

Pure pyarrow + stdlib: no torch, no transformers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# The manifest half lives in manifest.py (standard library only, so `dpo cache info` needs no
# pyarrow). Its names are importable from here too, so callers use one module for the cache.
from dpocli.cache.manifest import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_PATTERN,
    TOKENIZER_DIR,
    Manifest,
    canonical_json,
    commit_manifest,
    explain_mismatch,
    fingerprint,
    info,
    read_manifest,
    shard_name,
    tokenizer_file_hashes,
    verify_shards,
    verify_tokenizer_files,
)
from dpocli.errors import DpocliError
from dpocli.io.atomic import atomic_path, sha256_file

SPILL_PREFIX = "dpocli-cache-"  # the memory-mapped copy of a loaded cache (see `spill_cache`)

ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
IMAGES, IMAGE_SHA256 = "images", "image_sha256"  # vision-language caches only (vision.py)


def cache_schema(token_logps: bool, vision: bool = False) -> pa.Schema:
    fields = [
        pa.field("id", pa.string()),
        pa.field("source_row", pa.int64()),  # position in the input: lets --no-shuffle follow it
        pa.field("prompt_ids", pa.list_(pa.int32())),
        pa.field("chosen_ids", pa.list_(pa.int32())),
        pa.field("rejected_ids", pa.list_(pa.int32())),
        pa.field("chosen_len", pa.int32()),
        pa.field("rejected_len", pa.int32()),
        # TRL's own column names; float64 because sums over long completions lose digits in fp32.
        pa.field("ref_chosen_logps", pa.float64()),
        pa.field("ref_rejected_logps", pa.float64()),
    ]
    if token_logps:
        fields += [pa.field("ref_chosen_token_logps", pa.list_(pa.float32())),
                   pa.field("ref_rejected_token_logps", pa.list_(pa.float32()))]
    if vision:  # a vision-language cache: each row's images (encoded bytes) and their sha256
        fields += [pa.field(IMAGES, pa.list_(pa.binary())), pa.field(IMAGE_SHA256, pa.list_(pa.string()))]
    return pa.schema(fields)


def write_shard(cache_dir: str | Path, index: int, columns: dict, token_logps: bool,
                spec: dict) -> dict:
    """Write one shard atomically; return its manifest entry (without `dropped`)."""
    schema = cache_schema(token_logps, vision="vision" in spec).with_metadata(
        {"dpocli.spec": canonical_json(spec), "dpocli.shard_index": str(index)})
    table = pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)
    path = Path(cache_dir) / shard_name(index)
    with atomic_path(path) as tmp:
        # Fixed writer options so equal inputs give byte-identical shards (and equal checksums).
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)
    return {"index": index, "file": path.name, "rows": table.num_rows, "sha256": sha256_file(path)}


class CacheData:
    """All rows of a complete cache in memory as flat numpy arrays, ordered by `source_row`.

    List columns are stored as (values, offsets) so a row is a zero-copy slice; this keeps a
    100k-pair cache at a few bytes per token instead of Python lists of ints.
    `shard` and `shard_position` say where each row is stored: the reference batches were planned
    per stored shard, in stored order, so that is what a replay must group by (not arithmetic on
    `source_row`, which skips rows dropped while reading).
    The arrays are read-only views of `table`'s buffers: of private memory after `load_cache`, of
    a memory-mapped file after `map_cache` (then only `ids`, Python strings, is private).
    """

    def __init__(self, table: pa.Table):
        if not _non_decreasing(table.column("source_row").to_numpy()):
            table = table.sort_by("source_row")  # stable: a sorted table stays as it is
        # One chunk per column (free when it already is: a sorted or memory-mapped table), so the
        # numpy arrays below are views of the table's buffers, and `table` can be spilled as is.
        self.table = table = table.combine_chunks()
        self.num_rows = table.num_rows
        self.ids = table.column("id").to_pylist()
        self.source_row = table.column("source_row").to_numpy()
        self.shard = table.column("shard").to_numpy()
        self.shard_position = table.column("shard_position").to_numpy()
        self.scalars = {name: table.column(name).to_numpy() for name in
                        ("chosen_len", "rejected_len", "ref_chosen_logps", "ref_rejected_logps")}
        self.lists = {}
        for name in ID_COLUMNS + ("ref_chosen_token_logps", "ref_rejected_token_logps"):
            if name in table.column_names:
                column = table.column(name)
                arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
                self.lists[name] = (arr.values.to_numpy(), arr.offsets.to_numpy())
        # A derived cache's replay records (see `read_replay`): shard -> its forwards, shard -> its
        # first ghost number, and the ghosts' id lists; a forward names ghost g as member -(g + 1).
        self.replay_plans: dict[int, list[list[int]]] = {}
        self.ghost_base: dict[int, int] = {}
        self.ghost_lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # Vision-language caches: the images column stays Arrow (bytes are read per batch), and
        # `pixels` (rows -> the image processor's tensors) is attached by vlm_scoring.attach.
        self.images = table.column(IMAGES).combine_chunks() if IMAGES in table.column_names else None
        self.image_sha256 = (table.column(IMAGE_SHA256).combine_chunks()
                             if IMAGE_SHA256 in table.column_names else None)
        self.pixels = None

    def row_images(self, i: int) -> list[tuple[bytes, str]]:
        """(bytes, stored sha256) of row i's images; [] for a text-only cache."""
        if self.images is None:
            return []
        return list(zip(self.images[i].as_py(), self.image_sha256[i].as_py()))

    def row_list(self, name: str, i: int) -> np.ndarray:
        values, offsets = self.ghost_lists[name] if i < 0 else self.lists[name]
        i = -i - 1 if i < 0 else i
        return values[offsets[i]:offsets[i + 1]]

    def seq_len(self, i: int) -> int:
        """Longer of prompt+chosen and prompt+rejected, for batching."""
        p = self.row_list("prompt_ids", i).shape[0]
        return p + max(int(self.scalars["chosen_len"][i]), int(self.scalars["rejected_len"][i]))

    def pair_lens(self, i: int) -> tuple[int, int, int]:
        """(prompt, chosen, rejected) token counts of row i."""
        return (int(self.row_list("prompt_ids", i).shape[0]), int(self.scalars["chosen_len"][i]),
                int(self.scalars["rejected_len"][i]))

    def trl_tokens(self, rows) -> int:
        """TRL's `num_tokens` of these rows (its attention-mask sum: prompt+chosen plus
        prompt+rejected, no padding), the same whatever the batch layout."""
        return sum(2 * p + c + r for p, c, r in (self.pair_lens(i) for i in rows))

    def shard_rows(self) -> dict[int, list[int]]:
        """Shard index -> its rows (indices into this object), in the order the shard stores them."""
        grouped: dict[int, list[int]] = {}
        for i in np.lexsort((self.shard_position, self.shard)):
            grouped.setdefault(int(self.shard[i]), []).append(int(i))
        return grouped


def _non_decreasing(values: np.ndarray) -> bool:
    return bool(np.all(values[1:] >= values[:-1]))


def spill_cache(data: CacheData, folder: str | Path | None = None) -> Path:
    """Write `data`'s rows to an uncompressed Arrow IPC file that `map_cache` maps without copying.

    The file goes to `folder` (default: TMPDIR, through `tempfile`), named `dpocli-cache-<pid>-*.arrow`
    so that it is recognisably dpocli's; the caller removes it once it is mapped. A failed write
    removes it at once."""
    fd, name = tempfile.mkstemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", suffix=".arrow", dir=folder)
    try:
        with os.fdopen(fd, "wb") as sink, pa.ipc.new_file(sink, data.table.schema) as writer:
            writer.write_table(data.table)  # one record batch: the table has one chunk per column
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


REPLAY_COLUMNS = ID_COLUMNS  # what a replay-only row keeps: the tokens of a forward it took part in


def replay_name(index: int) -> str:
    return f"replay-{index:05d}.parquet"


def replay_schema() -> pa.Schema:
    """A derived shard's replay file: one row per member of each reference forward to rerun, in
    order. `member` >= 0 is a row of the shard (by stored position, lists empty); `member` = -(g + 1)
    is replay-only row g, whose token ids the row carries (each appears once, g = 0, 1, ... in order)."""
    return pa.schema([pa.field("batch", pa.int32()), pa.field("member", pa.int32())]
                     + [pa.field(name, pa.list_(pa.int32())) for name in REPLAY_COLUMNS])


def read_replay_table(path: Path) -> pa.Table:
    try:
        with pq.ParquetFile(path) as f:
            return f.read()
    except Exception:
        raise DpocliError("is not a readable Parquet file (truncated or corrupt)", file=path) from None


def read_replay_file(path: Path) -> tuple[list[list[int]], pa.Table]:
    """(the forwards as lists of members, the replay-only rows' id columns in ghost order)."""
    table = read_replay_table(path)
    batch, member = table.column("batch").to_numpy(), table.column("member").to_numpy()
    bounds = np.flatnonzero(np.diff(batch)) + 1
    plan = [part.tolist() for part in np.split(member, bounds)] if member.size else []
    ghosts = table.filter(pa.array(member < 0)).select(list(REPLAY_COLUMNS))
    return plan, ghosts


def read_replay(cache_dir: str | Path, manifest: Manifest, data: CacheData) -> CacheData:
    """Attach a derived cache's replay records to `data`: per shard the reference forwards that
    precompute ran, and the pairs that were dropped from them (filter, split, merge) but shared a
    forward with a kept row. `dpo eval` runs those forwards again, so the kept rows are scored
    exactly as precompute scored them; the replay-only rows' results are discarded."""
    tables = []
    for entry in sorted(manifest.shards, key=lambda e: e["index"]):
        if entry.get("replay"):
            plan, ghosts = read_replay_file(Path(cache_dir) / entry["replay"]["file"])
            data.replay_plans[entry["index"]] = plan
            data.ghost_base[entry["index"]] = sum(t.num_rows for t in tables)
            tables.append(ghosts)
    if tables:
        table = pa.concat_tables(tables).combine_chunks()
        for name in REPLAY_COLUMNS:
            arr = table.column(name).chunk(0) if table.num_rows else pa.array([], pa.list_(pa.int32()))
            data.ghost_lists[name] = (arr.values.to_numpy(), arr.offsets.to_numpy())
    return data


def map_cache(path: str | Path) -> CacheData:
    """The rows of a `spill_cache` file, memory-mapped: the arrays are views of the file's pages,
    which the page cache holds once for every process that maps it (and may evict: they are clean)."""
    return CacheData(pa.ipc.open_file(pa.memory_map(str(path))).read_all())


def _read_rows(cache_dir: str | Path, manifest: Manifest) -> pa.Table:
    """Every listed shard's rows, with the columns `shard` and `shard_position` added."""
    tables = []
    for entry in sorted(manifest.shards, key=lambda e: e["index"]):
        path = Path(cache_dir) / entry["file"]
        try:
            # ParquetFile, not pq.read_table: one file needs no pyarrow.dataset, whose import
            # (with pyarrow.compute) costs more than reading a small cache (`cache verify` start-up).
            with pq.ParquetFile(path) as shard:
                table = shard.read()
        except Exception:
            raise DpocliError("is not a readable Parquet file (truncated or corrupt)", file=path) from None
        tables.append(table.append_column("shard", pa.array([entry["index"]] * table.num_rows, pa.int64()))
                      .append_column("shard_position", pa.array(np.arange(table.num_rows), pa.int64())))
    if not tables:
        empty = cache_schema(False).empty_table()
        tables = [empty.append_column("shard", pa.array([], pa.int64()))
                  .append_column("shard_position", pa.array([], pa.int64()))]
    table = pa.concat_tables(tables)
    expected = set(cache_schema(False).names)
    missing = expected - set(table.column_names)
    if missing:
        raise DpocliError(f"lacks columns {sorted(missing)}", file=cache_dir, field=sorted(missing)[0])
    return table


@contextmanager
def _system_allocator():
    """Arrow's default pool (mimalloc) keeps much of what it frees: loading a cache through it left
    a few bytes per token resident besides the 4 the arrays need (bench/RESULTS.md, "The cache in
    memory"). Through malloc, a freed block goes back to the system: at once when it is large (under
    torchrun, see `distributed.MMAP_THRESHOLD`), else by `release_freed_memory`."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)
        release_freed_memory()  # the decoded shards and the copies made while sorting


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's `malloc_trim`; a no-op elsewhere).
    Without it, a load's freed intermediates stay resident: measured 1-6 bytes per token."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_cache(cache_dir: str | Path, *, checksums: bool = True) -> tuple[Manifest, CacheData]:
    """Open a complete cache, checking manifest, shard row counts, checksums and values."""
    manifest = read_manifest(cache_dir)
    if not manifest.complete:
        raise DpocliError(f"is incomplete ({len(manifest.shards)} of {manifest.planned_shards} "
                          "shards); the precompute run was interrupted", file=cache_dir,
                          hint="rerun the same `dpo precompute-ref` command to finish it")
    verify_shards(cache_dir, manifest, checksums=checksums)
    verify_tokenizer_files(cache_dir, manifest, checksums=checksums)
    with _system_allocator():
        data = read_replay(cache_dir, manifest, CacheData(_read_rows(cache_dir, manifest)))
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        bad = np.flatnonzero(~np.isfinite(data.scalars[name]))
        if bad.size:
            raise DpocliError(f"holds a non-finite value ({data.scalars[name][bad[0]]})",
                              file=cache_dir, row=int(data.source_row[bad[0]]) + 1, field=name,
                              hint="recreate the cache; check the reference model's dtype")
    if len(set(data.ids)) != data.num_rows:
        seen: set[str] = set()
        dup = next(i for i in data.ids if i in seen or seen.add(i))
        raise DpocliError(f"lists id {dup!r} more than once", file=cache_dir, field="id",
                          hint="recreate the cache")
    if data.num_rows != manifest.rows_written:
        raise DpocliError(f"has {data.num_rows} rows, the manifest lists {manifest.rows_written}",
                          file=cache_dir, field="rows_written")
    verify_images(data, cache_dir)
    return manifest, data


def verify_images(data: CacheData, cache_dir) -> None:
    """Every stored image's bytes hash to the sha256 recorded at precompute, else the row is named
    (a vision-language cache; nothing to do for a text cache)."""
    for i in range(data.num_rows if data.images is not None else 0):
        for k, (blob, digest) in enumerate(data.row_images(i)):
            if hashlib.sha256(blob).hexdigest() != digest:
                raise DpocliError(f"image {k} changed since precompute (its sha256 differs from the one "
                                  "recorded)", file=cache_dir, row=int(data.source_row[i]) + 1,
                                  field=f"images[{k}]", hint="recreate the cache with `dpo precompute-ref`")


def length_stats(prompt_lens, chosen_lens, rejected_lens) -> dict:
    def describe(values) -> dict:
        a = np.asarray(values, dtype=np.float64)
        if a.size == 0:
            return {}
        return {"mean": round(float(a.mean()), 3), "min": int(a.min()), "max": int(a.max()),
                "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}
    return {"prompt": describe(prompt_lens), "chosen": describe(chosen_lens),
            "rejected": describe(rejected_lens)}


def load_matching_cache(cache_dir: str | Path, reference: Manifest,
                        loader=load_cache) -> tuple[Manifest, CacheData]:
    """A second cache (e.g. --eval-cache) that must share the first one's tokenization;
    `loader(cache_dir)` opens it (`shared_cache.load_cache` under torchrun)."""
    manifest, data = loader(cache_dir)
    for key in ("conventions", "tokenizer"):
        differs = explain_mismatch(reference.spec[key], manifest.spec[key], key)
        if differs:
            raise DpocliError(f"was made differently from the training cache ({differs})",
                              file=cache_dir, field=key)
    return manifest, data


def identity(manifest: Manifest, data: CacheData) -> dict:
    """What a resumed run must find again: the same spec and the same rows in the same order."""
    ids = hashlib.sha256("\n".join(data.ids).encode("utf-8")).hexdigest()
    return {"spec_fingerprint": manifest.spec_fingerprint, "ids_sha256": ids}


