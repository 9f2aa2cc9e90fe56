"""Tests for dpocli.cache.manifest's Parquet footer reader, which lets `dpo cache info` check shard row
counts without importing pyarrow. Expected values: pyarrow's own metadata, for files pyarrow
writes, and a footer assembled by hand from the Thrift compact protocol spec.

The manifest itself (round trip, signature, refusals) is tested in test_cache.py.
"""

from __future__ import annotations

import datetime
import decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpocli.cache.manifest import parquet_num_rows
from dpocli.cache.store import write_shard


def varied_table(rows: int) -> pa.Table:
    """16 columns (so the schema list needs the long list header) of assorted types, including
    logical types whose Thrift structs nest unions, bools and empty structs."""
    cols = {f"int_{i}": pa.array(range(rows), pa.int64()) for i in range(4)}
    cols |= {
        "s": pa.array([f"row {i}" for i in range(rows)]),
        "dict": pa.array(["a", "b"] * (rows // 2) + ["a"] * (rows % 2)).dictionary_encode(),
        "flag": pa.array([i % 2 == 0 for i in range(rows)]),
        "f32": pa.array([i / 3 for i in range(rows)], pa.float32()),
        "ts": pa.array([datetime.datetime(2026, 1, 1)] * rows, pa.timestamp("us", tz="UTC")),
        "day": pa.array([datetime.date(2026, 1, 1)] * rows, pa.date32()),
        "dec": pa.array([decimal.Decimal("1.25")] * rows, pa.decimal128(9, 2)),
        "blob": pa.array([bytes([i % 256]) * 40 for i in range(rows)], pa.large_binary()),
        "ids": pa.array([list(range(i % 5)) for i in range(rows)], pa.list_(pa.int32())),
        "nested": pa.array([[{"k": i, "v": [1.5]}] for i in range(rows)]),
        "kv": pa.array([[("x", i)] for i in range(rows)], pa.map_(pa.string(), pa.int64())),
        "maybe": pa.array([None if i % 3 else i for i in range(rows)], pa.int16()),
    }
    return pa.table(cols).replace_schema_metadata({"note": "x" * 300})


@pytest.mark.parametrize(
    "rows, options",
    [
        (0, {}),
        (1, {}),
        (100, {"row_group_size": 7}),  # 15 row groups
        (1000, {"compression": "zstd", "write_statistics": True, "write_page_index": True}),
        (50, {"compression": "none", "use_dictionary": False, "version": "1.0"}),
    ],
)
def test_row_count_matches_pyarrow(tmp_path, rows, options):
    path = tmp_path / "t.parquet"
    pq.write_table(varied_table(rows), path, **options)
    assert parquet_num_rows(path) == pq.ParquetFile(path).metadata.num_rows == rows


def test_row_count_of_a_cache_shard(tmp_path):
    rows = 37
    columns = {"id": [f"r{i}" for i in range(rows)], "source_row": list(range(rows)),
               "prompt_ids": [[1, 2]] * rows, "chosen_ids": [[3]] * rows, "rejected_ids": [[4]] * rows,
               "chosen_len": [1] * rows, "rejected_len": [1] * rows,
               "ref_chosen_logps": [-1.0] * rows, "ref_rejected_logps": [-2.0] * rows}
    entry = write_shard(tmp_path, 0, columns, False, {"spec": "with key-value metadata"})
    assert parquet_num_rows(tmp_path / entry["file"]) == entry["rows"] == rows


def footer_file(tmp_path, footer: bytes):
    path = tmp_path / "hand.parquet"
    path.write_bytes(b"PAR1" + footer + len(footer).to_bytes(4, "little") + b"PAR1")
    return path


def test_hand_made_footer(tmp_path):
    """A FileMetaData written byte by byte: field 1 in the long header form, field 2 a list of
    bools, field 4 (a map) before field 3, so field 3 needs the long form too.
    num_rows = 1234: zigzag gives 2468 = 19 * 128 + 36, so its varint is a4 13."""
    footer = bytes([
        0x05, 0x02, 0x04,              # i32 (5) with delta 0; field id zigzag(1) = 2; value zigzag(2) = 4
        0x19, 0x31, 1, 2, 1,           # field 2 (delta 1), list (9): 3 elements, bool (1), a byte each
        0x2B, 0x01, 0x55, 0x02, 0x03,  # field 4 (delta 2), map (11): 1 entry, i32 (5) -> i32 (5)
        0x06, 0x06, 0xA4, 0x13,        # i64 (6) with delta 0; field id zigzag(3) = 6; value
        0x00,                          # end of struct
    ])
    assert parquet_num_rows(footer_file(tmp_path, footer)) == 1234


@pytest.mark.parametrize(
    "damage",
    ["truncated", "empty", "no magic", "footer too long", "footer cut short", "no num_rows"],
)
def test_not_a_parquet_file_raises_value_error(tmp_path, damage):
    path = tmp_path / "t.parquet"
    pq.write_table(varied_table(20), path)
    data = path.read_bytes()
    footer_len = int.from_bytes(data[-8:-4], "little")
    broken = {
        "truncated": data[:-20],
        "empty": b"",
        "no magic": b"PAR0" + data[4:],
        "footer too long": data[:-8] + (len(data)).to_bytes(4, "little") + b"PAR1",
        # keep the magic bytes but claim a footer of only its first 30 bytes
        "footer cut short": data[: -8 - footer_len + 30] + (30).to_bytes(4, "little") + b"PAR1",
        "no num_rows": b"PAR1" + bytes([0x15, 0x04, 0x00]) + (3).to_bytes(4, "little") + b"PAR1",
    }[damage]
    path.write_bytes(broken)
    with pytest.raises(ValueError):
        parquet_num_rows(path)
