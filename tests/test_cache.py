"""Tests for dpocli.cache.store, on caches built by construction (write_shard + commit_manifest, no model).

Expected values are the rows the test wrote; tampering is done by hand on the files.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from dpocli.cache import store as cache
from dpocli.cache.store import (
    Manifest,
    commit_manifest,
    explain_mismatch,
    load_cache,
    read_manifest,
    verify_shards,
    write_shard,
)
from dpocli.errors import DpocliError

SPEC = {"conventions": "trl-1.x", "max_length": 64, "dtype": "float32", "token_logps": False,
        "reference_model": {"path": "m", "revision": None, "sha256": "ab" * 32},
        "tokenizer": {"fingerprint": "cd" * 32, "eos_token": "</s>", "pad_token_id": 0},
        "truncation": "keep_start", "attn_implementation": "default",
        "batching": {"rows_per_shard": 4096, "packing": False, "prefix_sharing": False},
        "input": {"files": [{"path": "p.jsonl"}], "dropped_on_read": {"identical_chosen_rejected": 1},
                  "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": None},
                  "drop_identical": False}}  # every field a cache's spec has (manifest.MANIFEST_SCHEMA)
BUDGET = {"batch_size": None, "max_tokens": 16384}  # each shard's, as precompute records it


def make_row(source_row: int) -> dict:
    """A row whose values are simple functions of its position, so any mix-up shows."""
    n = source_row % 3 + 1
    return {"id": f"row-{source_row}", "source_row": source_row,
            "prompt_ids": [1, 10 + source_row], "chosen_ids": list(range(100, 100 + n)) + [2],
            "rejected_ids": [200 + source_row, 2], "chosen_len": n + 1, "rejected_len": 2,
            "ref_chosen_logps": -1.5 * source_row - 0.25, "ref_rejected_logps": -2.0 * source_row - 0.5}


def columns(rows: list[dict]) -> dict:
    names = list(make_row(0))
    cols = {name: [r[name] for r in rows] for name in names}
    cols["ref_chosen_token_logps"] = cols["ref_rejected_token_logps"] = [None] * len(rows)
    return cols


def add_tokenizer(out, manifest: Manifest) -> None:
    """A stand-in tokenizer/ folder (any bytes do: only its hashes are checked here), listed in
    the manifest as precompute lists it."""
    folder = out / cache.TOKENIZER_DIR
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"model": "stand-in"}')
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    manifest.tokenizer_files = cache.tokenizer_file_hashes(folder)


def build(tmp_path, shards: list[list[int]], *, complete=True, spec=SPEC, name="c") -> tuple:
    """A cache folder with one shard per list of source rows (rows written in the given order)."""
    out = tmp_path / name
    out.mkdir()
    manifest = Manifest(spec=spec, planned_shards=len(shards), rows_read=sum(map(len, shards)) + 1)
    for index, rows in enumerate(shards):
        if not complete and index == len(shards) - 1:
            break
        entry = write_shard(out, index, columns([make_row(r) for r in rows]), False, spec)
        entry["dropped"] = {"prompt_too_long": index}
        entry["budget"] = BUDGET
        manifest.shards.append(entry)
    manifest.complete = complete
    add_tokenizer(out, manifest)
    commit_manifest(out, manifest)
    return out, manifest


def edit_manifest(path, change) -> None:
    body = json.loads((path / "manifest.json").read_text())
    change(body)
    (path / "manifest.json").write_text(json.dumps(body))


def resign(body: dict) -> None:
    """Recompute manifest_sha256 the way the format defines it (sha256 of canonical JSON)."""
    body.pop("manifest_sha256")
    body["manifest_sha256"] = cache.fingerprint(body)


# --- manifest ---

def test_manifest_round_trip(tmp_path):
    out, manifest = build(tmp_path, [[0, 1], [2]])
    again = read_manifest(out)
    assert again == manifest
    assert again.spec_fingerprint == manifest.spec_fingerprint == cache.fingerprint(SPEC)
    assert again.rows_written == 3 and again.planned_shards == 2 and again.complete
    # Dropped rows: per shard (0 + 1) plus the ones dropped while reading.
    assert again.dropped == {"prompt_too_long": 1, "identical_chosen_rejected": 1}
    body = json.loads((out / "manifest.json").read_text())
    assert body["format"] == "dpocli-reference-cache" and body["format_version"] == 2
    assert body["tokenizer_files"] == again.tokenizer_files
    assert set(again.tokenizer_files) == {"tokenizer.json", "tokenizer_config.json"}
    assert body["rows_written"] == 3 and body["spec_fingerprint"] == cache.fingerprint(SPEC)
    assert Manifest.from_dict(manifest.to_dict(), "x") == manifest


def test_spec_fingerprint_ignores_key_order():
    reordered = json.loads(json.dumps(SPEC))
    reordered = {k: reordered[k] for k in reversed(list(reordered))}
    assert cache.fingerprint(reordered) == cache.fingerprint(SPEC)
    assert cache.fingerprint({**SPEC, "max_length": 65}) != cache.fingerprint(SPEC)


@pytest.mark.parametrize("field,value", [("rows_read", 999), ("complete", False),
                                         ("spec", {**SPEC, "max_length": 4096})])
def test_hand_edited_manifest_is_detected(tmp_path, field, value):
    out, _ = build(tmp_path, [[0, 1]])
    edit_manifest(out, lambda body: body.__setitem__(field, value))
    for opener in (read_manifest, load_cache):
        with pytest.raises(DpocliError) as err:
            opener(out)
        assert err.value.field == "manifest_sha256" and "modified" in str(err.value)


def test_manifest_with_a_valid_signature_is_accepted_after_edit(tmp_path):
    # Control for the test above: the checksum, not the edit itself, is what is checked.
    out, _ = build(tmp_path, [[0, 1]])
    edit_manifest(out, lambda body: (body.__setitem__("created", {"note": "x"}), resign(body)))
    assert read_manifest(out).created == {"note": "x"}


def test_version_1_cache_is_refused_with_a_hint_to_recreate(tmp_path):
    # Version 1 had no tokenizer hashes and no batching record: it cannot be checked or replayed.
    out, _ = build(tmp_path, [[0]])
    edit_manifest(out, lambda body: (body.__setitem__("format_version", 1), body.pop("tokenizer_files"),
                                     resign(body)))
    for opener in (read_manifest, load_cache):
        with pytest.raises(DpocliError) as err:
            opener(out)
        assert err.value.field == "format_version" and "version 1" in str(err.value)
        assert "precompute-ref" in err.value.hint


def test_not_a_manifest(tmp_path):
    out, _ = build(tmp_path, [[0]])
    edit_manifest(out, lambda body: (body.__setitem__("format_version", 99), resign(body)))
    with pytest.raises(DpocliError) as err:
        read_manifest(out)
    assert err.value.field == "format_version"
    (out / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(DpocliError) as err:
        read_manifest(out)
    assert err.value.field == "format"
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DpocliError, match="not valid JSON"):
        read_manifest(out)
    with pytest.raises(DpocliError, match="no such cache folder"):
        read_manifest(tmp_path / "nowhere")
    (out / "manifest.json").unlink()
    with pytest.raises(DpocliError, match="no manifest.json"):
        load_cache(out)


# --- shards ---

def test_load_round_trip_and_order(tmp_path):
    # Shards listed out of source order, rows inside each shard shuffled.
    out, _ = build(tmp_path, [[5, 3, 4], [0, 2, 1], [6]])
    manifest, data = load_cache(out)
    assert data.num_rows == 7 == manifest.rows_written
    assert data.source_row.tolist() == list(range(7))
    assert data.ids == [f"row-{i}" for i in range(7)]
    for i in range(7):
        row = make_row(i)
        assert data.row_list("prompt_ids", i).tolist() == row["prompt_ids"]
        assert data.row_list("chosen_ids", i).tolist() == row["chosen_ids"]
        assert data.row_list("rejected_ids", i).tolist() == row["rejected_ids"]
        assert data.scalars["ref_chosen_logps"][i] == row["ref_chosen_logps"]
        assert data.scalars["ref_rejected_logps"][i] == row["ref_rejected_logps"]
        assert data.scalars["chosen_len"][i] == row["chosen_len"]
        assert data.seq_len(i) == 2 + max(row["chosen_len"], row["rejected_len"])
        assert data.pair_lens(i) == (2, row["chosen_len"], row["rejected_len"])
    # Where each row is stored, in stored order: what eval's replay of precompute groups by.
    assert data.shard.tolist() == [1, 1, 1, 0, 0, 0, 2]
    stored = {s: [int(data.source_row[i]) for i in rows] for s, rows in data.shard_rows().items()}
    assert stored == {0: [5, 3, 4], 1: [0, 2, 1], 2: [6]}


def test_shard_membership_does_not_follow_source_row_arithmetic(tmp_path):
    # Rows dropped while reading (--drop-identical) leave gaps in source_row, so shard i does not
    # hold source rows [i*n, (i+1)*n): here 3 rows per shard, with source rows 1 and 4 dropped.
    out, _ = build(tmp_path, [[0, 2, 3], [5, 6, 7]])
    _, data = load_cache(out)
    stored = {s: [int(data.source_row[i]) for i in rows] for s, rows in data.shard_rows().items()}
    assert stored == {0: [0, 2, 3], 1: [5, 6, 7]}


def test_shard_carries_spec_and_schema(tmp_path):
    out, manifest = build(tmp_path, [[0, 1]])
    meta = pq.read_schema(out / "part-00000.parquet").metadata
    assert json.loads(meta[b"dpocli.spec"]) == SPEC and meta[b"dpocli.shard_index"] == b"0"
    table = pq.read_table(out / "part-00000.parquet")
    assert str(table.schema.field("ref_chosen_logps").type) == "double"
    assert str(table.schema.field("prompt_ids").type) == "list<element: int32>"
    assert manifest.shards[0]["file"] == "part-00000.parquet" and manifest.shards[0]["rows"] == 2


def test_equal_inputs_give_byte_identical_shards(tmp_path):
    a, ma = build(tmp_path, [[0, 1, 2]], name="a")
    b, mb = build(tmp_path, [[0, 1, 2]], name="b")
    assert (a / "part-00000.parquet").read_bytes() == (b / "part-00000.parquet").read_bytes()
    assert ma.shards == mb.shards


def test_failed_shard_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "c"
    out.mkdir()

    def broken(table, where, **kwargs):
        where.write_bytes(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(cache.pq, "write_table", broken)
    with pytest.raises(cache.DpocliError, match="cannot be written"):  # one line, exit 1
        write_shard(out, 0, columns([make_row(0)]), False, SPEC)
    assert list(out.iterdir()) == []  # no shard, no temporary


def test_modified_shard_is_refused(tmp_path):
    out, _ = build(tmp_path, [[0, 1], [2, 3]])
    # Same row count, different values: only the checksum can tell.
    rows = [make_row(2), make_row(3)]
    rows[0]["ref_chosen_logps"] = -0.125
    tampered = tmp_path / "t"
    tampered.mkdir()
    write_shard(tampered, 1, columns(rows), False, SPEC)
    (out / "part-00001.parquet").write_bytes((tampered / "part-00001.parquet").read_bytes())
    with pytest.raises(DpocliError) as err:
        load_cache(out)
    assert err.value.field == "sha256" and err.value.file.endswith("part-00001.parquet")
    load_cache(out, checksums=False)  # the file itself is fine


def test_truncated_shard_is_refused(tmp_path):
    out, _ = build(tmp_path, [[0, 1], [2, 3]])
    path = out / "part-00000.parquet"
    path.write_bytes(path.read_bytes()[:-20])
    for checksums in (True, False):
        with pytest.raises(DpocliError, match="not a readable Parquet file"):
            load_cache(out, checksums=checksums)


def test_missing_shard_and_wrong_row_count_are_refused(tmp_path):
    out, _ = build(tmp_path, [[0, 1], [2, 3]])
    edit_manifest(out, lambda body: (body["shards"][0].__setitem__("rows", 3), resign(body)))
    with pytest.raises(DpocliError) as err:
        verify_shards(out, read_manifest(out))
    assert err.value.field == "rows"
    out, _ = build(tmp_path, [[0, 1], [2, 3]], name="d")
    (out / "part-00001.parquet").unlink()
    with pytest.raises(DpocliError, match="listed in the manifest but missing"):
        load_cache(out)


# --- tokenizer folder ---

@pytest.mark.parametrize("change", ["replaced", "missing", "added"])
def test_changed_tokenizer_folder_is_refused_naming_the_file(tmp_path, change):
    out, _ = build(tmp_path, [[0, 1]])
    folder = out / cache.TOKENIZER_DIR
    name = {"replaced": "tokenizer.json", "missing": "tokenizer_config.json",
            "added": "vocab.json"}[change]
    if change == "replaced":
        (folder / name).write_text('{"model": "another tokenizer"}')
    elif change == "missing":
        (folder / name).unlink()
    else:
        (folder / name).write_text("{}")
    with pytest.raises(DpocliError) as err:
        load_cache(out)
    assert err.value.field == "tokenizer_files" and err.value.file == str(folder / name)
    assert "tokenizer/" in err.value.hint
    if change == "replaced":  # only the hash can tell; without checksums the folder's shape passes
        load_cache(out, checksums=False)


def test_tokenizer_folder_is_checked_only_against_the_manifest(tmp_path):
    # Control: the same edit, re-listed in a re-signed manifest, is accepted.
    out, _ = build(tmp_path, [[0, 1]])
    (out / cache.TOKENIZER_DIR / "tokenizer.json").write_text('{"model": "re-listed"}')
    hashes = cache.tokenizer_file_hashes(out / cache.TOKENIZER_DIR)
    edit_manifest(out, lambda body: (body.__setitem__("tokenizer_files", hashes), resign(body)))
    load_cache(out)


def test_incomplete_cache_is_refused(tmp_path):
    out, manifest = build(tmp_path, [[0, 1], [2, 3]], complete=False)
    assert len(manifest.shards) == 1
    with pytest.raises(DpocliError, match=r"incomplete \(1 of 2 shards\)") as err:
        load_cache(out)
    assert "rerun" in err.value.hint
    # Marking it complete by hand breaks the signature instead.
    edit_manifest(out, lambda body: body.__setitem__("complete", True))
    with pytest.raises(DpocliError, match="modified"):
        load_cache(out)


@pytest.mark.parametrize("field", ["ref_chosen_logps", "ref_rejected_logps"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reference_value_is_refused(tmp_path, field, bad):
    rows = [make_row(i) for i in range(4)]
    rows[2][field] = bad  # source_row 2 -> row 3 (1-based) in the message
    out = tmp_path / "c"
    out.mkdir()
    manifest = Manifest(spec=SPEC, planned_shards=1, rows_read=4, complete=True)
    manifest.shards.append({**write_shard(out, 0, columns(rows[::-1]), False, SPEC), "budget": BUDGET})
    add_tokenizer(out, manifest)
    commit_manifest(out, manifest)
    verify_shards(out, read_manifest(out))  # checksums are fine: the values are the problem
    with pytest.raises(DpocliError) as err:
        load_cache(out)
    assert err.value.field == field and err.value.row == 3
    assert f":3: field '{field}'" in str(err.value) and "non-finite" in str(err.value)


def test_token_logps_columns(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    rows = [make_row(i) for i in range(3)]
    cols = columns(rows)
    cols["ref_chosen_token_logps"] = [[-0.5] * r["chosen_len"] for r in rows]
    cols["ref_rejected_token_logps"] = [[-0.25] * r["rejected_len"] for r in rows]
    spec = {**SPEC, "token_logps": True}
    manifest = Manifest(spec=spec, planned_shards=1, rows_read=3, complete=True)
    manifest.shards.append({**write_shard(out, 0, cols, True, spec), "budget": BUDGET})
    add_tokenizer(out, manifest)
    commit_manifest(out, manifest)
    _, data = load_cache(out)
    for i, r in enumerate(rows):
        assert data.row_list("ref_chosen_token_logps", i).tolist() == [-0.5] * r["chosen_len"]
        assert data.row_list("ref_rejected_token_logps", i).dtype == np.float32


# --- spec comparison ---

def test_explain_mismatch_names_the_dotted_field():
    assert explain_mismatch(SPEC, json.loads(json.dumps(SPEC))) is None
    other = json.loads(json.dumps(SPEC))
    other["reference_model"]["sha256"] = "cd" * 32
    msg = explain_mismatch(SPEC, other)
    assert msg.startswith("reference_model.sha256: ")
    assert "cache has 'cdcd" in msg and "run expects 'abab" in msg
    other = json.loads(json.dumps(SPEC))
    other["input"]["dropped_on_read"]["identical_chosen_rejected"] = 2
    assert explain_mismatch(SPEC, other) == ("input.dropped_on_read.identical_chosen_rejected: "
                                             "cache has 2, run expects 1")
    assert explain_mismatch(SPEC, {**SPEC, "max_length": 128}) == "max_length: cache has 128, run expects 64"
    assert explain_mismatch({**SPEC, "new": 1}, SPEC) == "new: missing"
    assert explain_mismatch(SPEC, {**SPEC, "new": 1}) == "new: unexpected"
    long = explain_mismatch({"x": "a" * 200}, {"x": "b" * 200})
    assert long.startswith("x: cache has 'bbb") and len(long) < 200
