"""Read a cache a piece at a time: the streaming half of the cache commands (`dpo cache audit`,
`filter`, `split`, `merge`), whose memory must not grow with the cache.

`open_cache` runs the checks `cache.load_cache` runs before reading rows (complete, shards present
with their row counts, optionally checksums, tokenizer files), without loading any row.
`iter_shards` yields each stored shard's rows in stored order, as pyarrow record batches of at most
`BATCH_ROWS` rows of the columns asked for; `Rows` turns one batch into the numpy views the
commands compute on. Peak memory is one record batch plus what the caller keeps.

Pure pyarrow + numpy: no torch, no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpocli.cache import row_keys
from dpocli.cache import store as cache
from dpocli.errors import DpocliError

BATCH_ROWS = 32768  # rows per record batch read: a few MB of tokens at typical lengths


def open_cache(cache_dir: str | Path, *, checksums: bool) -> cache.Manifest:
    """The manifest of a complete cache whose shards (and tokenizer files) check out."""
    manifest = cache.read_manifest(cache_dir)
    if not manifest.complete:
        raise DpocliError(
            f"is incomplete ({len(manifest.shards)} of {manifest.planned_shards} "
            "shards); the precompute run was interrupted",
            file=cache_dir,
            hint="rerun the same `dpo precompute-ref` command to finish it",
        )
    cache.verify_shards(cache_dir, manifest, checksums=checksums)
    cache.verify_tokenizer_files(cache_dir, manifest, checksums=checksums)
    return manifest


def shard_entries(manifest: cache.Manifest) -> list[dict]:
    """The manifest's shard entries in stored order (the order of the cache's rows)."""
    return sorted(manifest.shards, key=lambda e: e["index"])


def open_shard(cache_dir: str | Path, entry: dict) -> pq.ParquetFile:
    path = Path(cache_dir) / entry["file"]
    try:
        return pq.ParquetFile(path)
    except Exception:
        raise DpocliError("is not a readable Parquet file (truncated or corrupt)", file=path) from None


def iter_shard(cache_dir: str | Path, entry: dict, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """One shard's rows in stored order, `BATCH_ROWS` at a time."""
    with open_shard(cache_dir, entry) as shard:
        missing = [c for c in columns if c not in shard.schema_arrow.names]
        if missing:
            raise DpocliError(
                f"lacks columns {missing}", file=Path(cache_dir) / entry["file"], field=missing[0]
            )
        try:
            yield from shard.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False)
        except OSError:
            raise DpocliError(
                "is not a readable Parquet file (truncated or corrupt)", file=Path(cache_dir) / entry["file"]
            ) from None


def iter_shards(
    cache_dir: str | Path, manifest: cache.Manifest, columns: list[str]
) -> Iterator[tuple[dict, pa.RecordBatch]]:
    """(shard entry, record batch) over the whole cache in row order."""
    for entry in shard_entries(manifest):
        for batch in iter_shard(cache_dir, entry, columns):
            yield entry, batch


@dataclass
class Rows:
    """One record batch as numpy: lengths, reference values, and (lazily) the id lists and keys."""

    batch: pa.RecordBatch

    def column(self, name: str):
        return self.batch.column(self.batch.schema.get_field_index(name))

    def parts(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return row_keys.list_parts(self.column(name))

    def scalar(self, name: str) -> np.ndarray:
        return self.column(name).to_numpy(zero_copy_only=False)

    @property
    def prompt_len(self) -> np.ndarray:
        return np.diff(self.column("prompt_ids").offsets.to_numpy()).astype(np.int64)

    @property
    def chosen_len(self) -> np.ndarray:
        return self.scalar("chosen_len").astype(np.int64)

    @property
    def rejected_len(self) -> np.ndarray:
        return self.scalar("rejected_len").astype(np.int64)

    def total_len(self) -> np.ndarray:
        """prompt + the longer completion: the longest sequence the pair puts through the model."""
        return self.prompt_len + np.maximum(self.chosen_len, self.rejected_len)

    def margins(self) -> tuple[np.ndarray, np.ndarray]:
        """(sum, per-token) reference margins: chosen minus rejected summed log-probs, and chosen
        minus rejected mean log-probs per completion token."""
        chosen, rejected = self.scalar("ref_chosen_logps"), self.scalar("ref_rejected_logps")
        per_token = chosen / np.maximum(self.chosen_len, 1) - rejected / np.maximum(self.rejected_len, 1)
        return chosen - rejected, per_token

    def pair_keys(self) -> np.ndarray:
        hashes = [row_keys.hash_lists(*self.parts(name)) for name in cache.ID_COLUMNS]
        return row_keys.pair_keys(*hashes)

    def prefix_len(self) -> np.ndarray:
        return row_keys.common_prefix(self.parts("chosen_ids"), self.parts("rejected_ids"))

    def identical(self) -> np.ndarray:
        same_len = self.chosen_len == self.rejected_len
        return same_len & (self.prefix_len() == self.chosen_len)

    def at_max_length(self, max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected): the completion filled `max_length` with the prompt, so truncation
        may have cut it (or it fitted exactly: the cache keeps no length before truncation)."""
        p = self.prompt_len
        return p + self.chosen_len >= max_length, p + self.rejected_len >= max_length


AUDIT_COLUMNS = [
    "id",
    *cache.ID_COLUMNS,
    "chosen_len",
    "rejected_len",
    "ref_chosen_logps",
    "ref_rejected_logps",
]


CHUNK = 1 << 16  # keys looked up at a time: the lookups' temporaries stay under 2 MB


def _found(sorted_keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_keys, values)
    return (pos < sorted_keys.size) & (sorted_keys[np.minimum(pos, max(sorted_keys.size - 1, 0))] == values)


def count_duplicates_and_conflicts(sorted_keys: np.ndarray) -> tuple[int, int]:
    """(rows that repeat an earlier row, rows whose swap is in the cache) from every row's
    `pair_keys`, sorted. A pair with identical completions has orientation bit 0 and no row can
    have its key with bit 1, so it conflicts with nothing."""
    duplicates = conflicting = 0
    for a in range(0, sorted_keys.size, CHUNK):
        x = sorted_keys[max(a - 1, 0) : a + CHUNK]
        duplicates += int((x[1:] == x[:-1]).sum())
        conflicting += int(_found(sorted_keys, sorted_keys[a : a + CHUNK] ^ np.uint64(1)).sum())
    return duplicates, conflicting


def lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(repeated, conflicting) per row of `keys`: its key occurs more than once in the cache; its
    swap occurs in the cache."""
    left = np.searchsorted(sorted_keys, keys, side="left")
    right = np.searchsorted(sorted_keys, keys, side="right")
    return right - left > 1, _found(sorted_keys, keys ^ np.uint64(1))


def later_duplicates(indices: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Of the rows `indices` (in row order) whose keys repeat, those that are not the first of their
    key (the rows `--dedupe` drops)."""
    order = np.lexsort((indices, keys))
    ordered = keys[order]
    later = np.zeros(indices.size, dtype=bool)
    later[order[1:]] = ordered[1:] == ordered[:-1]
    return indices[later]
