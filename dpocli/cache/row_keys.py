"""Vectorised per-row facts about a batch of cache rows (numpy only, no per-row Python loop).

* `list_parts`: a Parquet list column as (flat values, start of each row, length of each row).
* `hash_lists`: a 64-bit hash of each row's list (order and length matter), for exact-duplicate
  detection without keeping the rows: two equal lists always hash equal; two different lists
  hash equal with probability about 2^-64, so among n rows a false match has probability about
  n^2 / 2^65 (1e-7 for 2 million rows).
* `pair_keys`: one 64-bit key per pair whose low bit is the orientation: the key of (prompt,
  chosen, rejected) and of (prompt, rejected, chosen) differ in that bit only, so a sorted array of
  keys finds exact duplicates (equal keys) and swapped pairs (keys equal but for bit 0).
* `common_prefix`: how many leading tokens the chosen and rejected completions share.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TABLE_SEED = 0x5EED_CAC4E
_tables: dict[int, np.ndarray] = {}


def list_parts(column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, starts, lengths) of a list (or binary) array or one-chunk column, zero-copy where
    pyarrow allows; `starts` index into `values`."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_binary(arr.type) or pa.types.is_string(arr.type):
        buffers = arr.buffers()
        offsets = np.frombuffer(buffers[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
        values = np.zeros(0, np.uint8) if buffers[2] is None else np.frombuffer(buffers[2], dtype=np.uint8)
    else:  # `.values` is the whole child array, `.offsets` index into it (also for a slice)
        offsets, values = arr.offsets.to_numpy(), arr.values.to_numpy()
    offsets = offsets.astype(np.int64)
    return values, offsets[:-1], np.diff(offsets)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _position_table(size: int) -> np.ndarray:
    """Odd 64-bit multipliers, one per position in a row (fixed seed: the same in every run)."""
    n = 1 << max(10, int(size - 1).bit_length())
    if n not in _tables:
        _tables[n] = np.random.default_rng(_TABLE_SEED).integers(
            0, 2**63, size=n, dtype=np.uint64
        ) * np.uint64(2) + np.uint64(1)
    return _tables[n]


def hash_lists(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint64 per row: Σ_j (v_j + 1)·R_j over the row's tokens (R a fixed random odd multiplier
    per position), mixed with the row's length. Rows must be contiguous in `values` in row order."""
    n = len(lengths)
    out = np.zeros(n, dtype=np.uint64)
    total = int(lengths.sum())
    if total:
        first = int(starts[0])
        flat = values[first : first + total].astype(np.uint64)
        positions = np.arange(total, dtype=np.int64) - np.repeat(starts - first, lengths)
        terms = (flat + np.uint64(1)) * _position_table(int(lengths.max()))[positions]
        nonempty = lengths > 0
        out[nonempty] = np.add.reduceat(terms, (starts - first)[nonempty])
    return _mix(out ^ ((lengths.astype(np.uint64) + np.uint64(1)) * _GOLDEN))


def pair_keys(prompt_h: np.ndarray, chosen_h: np.ndarray, rejected_h: np.ndarray) -> np.ndarray:
    """The key of each pair (module docstring); identical completions get orientation bit 0."""
    low, high = np.minimum(chosen_h, rejected_h), np.maximum(chosen_h, rejected_h)
    key = _mix(_mix(prompt_h ^ _mix(low)) + high * _GOLDEN)
    return (key & ~np.uint64(1)) | (chosen_h > rejected_h).astype(np.uint64)


def common_prefix(chosen: tuple, rejected: tuple) -> np.ndarray:
    """int64 per row: the length of the longest common prefix of the two completions; each
    argument is `list_parts` output."""
    (cv, cs, cl), (rv, rs, rl) = chosen, rejected
    m = np.minimum(cl, rl)
    out = np.zeros(len(m), dtype=np.int64)
    rows = np.flatnonzero(m > 0)
    if rows.size == 0:
        return out
    mm = m[rows]
    total = int(mm.sum())
    seg = np.cumsum(mm) - mm
    owner = np.repeat(np.arange(rows.size), mm)
    j = np.arange(total, dtype=np.int64) - seg[owner]
    equal = cv[cs[rows][owner] + j] == rv[rs[rows][owner] + j]
    first_diff = np.where(equal, mm[owner], j)
    out[rows] = np.minimum.reduceat(first_diff, seg)
    return out
