"""Tests for dpocli.data.examples: every accepted format, and every bad input -> one-line DpocliError naming
file:row:field. Expected values are written out by hand (or come from a verbatim copy of TRL's rule)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpocli.data import examples as data
from dpocli.data import rows as raw_rows
from dpocli.data.examples import Example, extract_prompt, list_input_files, read_examples
from dpocli.errors import DpocliError


def write_jsonl(path, rows):
    """Rows are dicts (dumped as JSON), str (written as-is) or bytes (written raw)."""
    out = b""
    for row in rows:
        if isinstance(row, dict):
            row = json.dumps(row)
        out += (row if isinstance(row, bytes) else row.encode()) + b"\n"
    path.write_bytes(out)
    return path


def msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def trl_extract_prompt(chosen, rejected):
    """Verbatim copy of trl.data_utils._extract_prompt (the independent reference)."""
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # remove space before the assistant response
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


# --- accepted inputs ---

def test_standard_rows_with_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2?", "chosen": " 4", "rejected": " 5"},
        "",
        "   ",
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    ])
    result = read_examples(path)
    first, second = result.examples
    assert (first.prompt, first.chosen, first.rejected, first.conversational) == ("2+2?", " 4", " 5", False)
    assert (first.file, first.row, first.source_row) == (str(path), 1, 0)
    assert (second.row, second.source_row) == (4, 1)  # blank lines count as lines, not rows
    canonical = '{"chosen":" 4","prompt":"2+2?","rejected":" 5"}'
    assert first.id == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert result.rows_read == 2 and result.dropped == {} and result.warnings == []
    assert result.files == [data.InputFile(str(path), path.stat().st_size,
                                           hashlib.sha256(path.read_bytes()).hexdigest(), 2)]


def test_conversational_rows_keep_every_message_key(tmp_path):
    # TRL hands each message dict to the chat template whole, so extra keys are kept, not dropped.
    chosen = [{"role": "assistant", "content": "Paris.", "weight": 1}]
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": msgs(("system", ""), ("user", "Capital of France?")), "chosen": chosen,
         "rejected": msgs(("assistant", "Lyon."))},
    ])
    (ex,) = read_examples(path).examples
    assert ex.conversational
    assert ex.prompt == msgs(("system", ""), ("user", "Capital of France?"))  # empty non-last content is fine
    assert ex.chosen == [{"role": "assistant", "content": "Paris.", "weight": 1}]
    assert ex.rejected == msgs(("assistant", "Lyon."))  # its own column: no 'weight' key added


@pytest.mark.parametrize("chosen, rejected, expected", [
    ("Q: hi A: yes", "Q: hi A: no", ("Q: hi A:", " yes", " no")),  # the space stays with the completion
    ("abcX", "abcY", ("abc", "X", "Y")),
    ("abc", "abcd", ("ab", "c", "cd")),                              # TRL quirk: prefix case
    ("same", "same", ("sam", "e", "e")),                              # TRL quirk: identical
    (msgs(("user", "u"), ("assistant", "a")), msgs(("user", "u"), ("assistant", "b")),
     (msgs(("user", "u")), msgs(("assistant", "a")), msgs(("assistant", "b")))),
])
def test_extract_prompt_matches_trl(chosen, rejected, expected):
    assert extract_prompt(chosen, rejected) == expected == trl_extract_prompt(chosen, rejected)


def test_extract_prompt_first_element_differs_gives_empty_prompt():
    # TRL would read chosen[-1] here and return "yes" minus its last char as the "prompt".
    assert extract_prompt("yes ", "no") == ("", "yes ", "no")


def test_implicit_prompt_string_and_messages(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [
        {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"},
        {"chosen": msgs(("user", "u"), ("assistant", "a")), "rejected": msgs(("user", "u"), ("assistant", "b"))},
    ])
    s, m = read_examples(path).examples
    assert (s.prompt, s.chosen, s.rejected) == ("Q: hi A:", " yes", " no")
    assert (m.prompt, m.chosen, m.rejected) == (msgs(("user", "u")), msgs(("assistant", "a")),
                                                msgs(("assistant", "b")))
    # The id hashes the pair after extraction, so the explicit-prompt form gets the same id.
    explicit = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Q: hi A:", "chosen": " yes", "rejected": " no"}])
    assert read_examples(explicit).examples[0].id == s.id


def test_parquet_standard_and_conversational_match_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(raw_rows, "_PARQUET_BATCH_ROWS", 2)  # force several record batches
    rows = [{"prompt": msgs(("user", f"q{i}")), "chosen": msgs(("assistant", f"yes{i}")),
             "rejected": msgs(("assistant", f"no{i}")), "extra": "x" * 10} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "conv.parquet")
    conv = read_examples(tmp_path / "conv.parquet")
    assert [e.row for e in conv.examples] == [1, 2, 3, 4, 5]
    assert conv.examples[3].chosen == msgs(("assistant", "yes3")) and conv.examples[3].conversational
    jsonl = read_examples(write_jsonl(tmp_path / "conv.jsonl", rows))
    assert [e.id for e in conv.examples] == [e.id for e in jsonl.examples]
    assert conv.files[0].rows == 5

    table = pa.table({"id": [7, 8], "prompt": ["a", "b"], "chosen": ["c", "d"], "rejected": ["e", "f"]})
    pq.write_table(table, tmp_path / "std.parquet")
    std = read_examples(tmp_path / "std.parquet")
    assert [(e.id, e.prompt, e.chosen, e.rejected) for e in std.examples] == [("7", "a", "c", "e"),
                                                                              ("8", "b", "d", "f")]


def test_parquet_message_structs_with_null_extra_fields(tmp_path):
    # pyarrow unifies struct fields across rows: messages without "name" come back with name=None,
    # and TRL renders them so; only chosen has the key, so chosen's user turn differs from
    # rejected's and the implicit prompt cannot be split off (TRL gets the same mismatch).
    rows = [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "name": "bot"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    with pytest.raises(DpocliError, match="share no common prefix"):
        read_examples(tmp_path / "s.parquet")
    rows[0]["prompt"] = [rows[0]["chosen"].pop(0)]
    rows[0]["rejected"].pop(0)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    (ex,) = read_examples(tmp_path / "s.parquet").examples
    assert ex.prompt == msgs(("user", "q"))
    assert ex.chosen == [{"role": "assistant", "content": "a", "name": "bot"}]
    assert ex.rejected == msgs(("assistant", "b"))
    # The JSON Lines form of the same rows reads the same, nulls where Arrow puts them included.
    two = [rows[0], {**rows[0], "chosen": msgs(("assistant", "c"))}]
    pq.write_table(pa.Table.from_pylist(two), tmp_path / "two.parquet")
    from_parquet = read_examples(tmp_path / "two.parquet").examples
    from_jsonl = read_examples(write_jsonl(tmp_path / "two.jsonl", two)).examples
    assert from_parquet[1].chosen == [{"role": "assistant", "content": "c", "name": None}]
    assert [(e.id, e.prompt, e.chosen, e.rejected) for e in from_parquet] == \
        [(e.id, e.prompt, e.chosen, e.rejected) for e in from_jsonl]


def test_folder_reads_files_in_name_order_and_continues_source_row(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p3", "chosen": "c", "rejected": "r"}])
    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in (1, 2)]),
                   tmp_path / "a.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "x.jsonl", [{"prompt": "no", "chosen": "c", "rejected": "r"}])
    assert [p.name for p in list_input_files(tmp_path)] == ["a.parquet", "b.jsonl"]
    result = read_examples(tmp_path)
    assert [(e.prompt, e.source_row, e.row, e.file) for e in result.examples] == [
        ("p1", 0, 1, str(tmp_path / "a.parquet")),
        ("p2", 1, 2, str(tmp_path / "a.parquet")),
        ("p3", 2, 1, str(tmp_path / "b.jsonl"))]
    assert [(f.path, f.rows) for f in result.files] == [(str(tmp_path / "a.parquet"), 2),
                                                         (str(tmp_path / "b.jsonl"), 1)]
    assert result.rows_read == 3


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode())
    (ex,) = read_examples(path).examples
    assert (ex.prompt, ex.row) == ("p", 1)


def test_identical_pairs_kept_with_warning_or_dropped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ])
    kept = read_examples(path)
    assert len(kept.examples) == 2 and kept.dropped == {}
    assert kept.warnings == ["1 row has chosen identical to rejected (kept; use --drop-identical to drop them)"]
    dropped = read_examples(path, drop_identical=True)
    assert [e.prompt for e in dropped.examples] == ["q"]
    assert dropped.examples[0].source_row == 1  # dropped rows still count
    assert dropped.rows_read == 2 and dropped.dropped == {"identical_chosen_rejected": 1}


def test_duplicate_pairs_get_suffixed_hash_ids(tmp_path):
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    ids = [e.id for e in read_examples(write_jsonl(tmp_path / "d.jsonl", [row, row, row])).examples]
    assert ids[1:] == [ids[0] + "-2", ids[0] + "-3"] and len(ids[0]) == 16


def test_custom_columns_and_id_column(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"q": "p", "good": "a", "bad": "b", "key": 12}])
    (ex,) = read_examples(path, prompt_column="q", chosen_column="good", rejected_column="bad",
                          id_column="key").examples
    assert (ex.id, ex.prompt, ex.chosen, ex.rejected) == ("12", "p", "a", "b")


def test_near_miss_prompt_column_warns(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [{"promt": "x", "chosen": "Q: a", "rejected": "Q: b"}])
    result = read_examples(path)
    assert result.examples[0].prompt == "Q:"
    near_miss, unused = result.warnings
    assert "--prompt-column promt" in near_miss
    assert unused.endswith("not rendered by TRL's DPOTrainer either: promt")


# --- bad inputs: one line naming file, row and field ---

def assert_one_line_error(excinfo, where: str, field: str | None, *fragments: str):
    text = str(excinfo.value)
    assert "\n" not in text
    assert text.startswith(where + ": ") or text.startswith(where + " "), text
    if field is not None:
        assert f"field '{field}'" in text, text
    for fragment in fragments:
        assert fragment in text, text


OK = {"prompt": "p", "chosen": "c", "rejected": "r"}

JSONL_CASES = [
    # (id, lines, kwargs, row, field, fragments)
    ("bad_json", [OK, '{"prompt": "p",'], {}, 2, None, ["not valid JSON", "at character 16"]),
    ("not_object", [OK, OK, "[1, 2]"], {}, 3, None, ["not an object", "got list"]),
    ("bad_utf8", [OK, b'{"prompt": "\xff", "chosen": "c", "rejected": "r"}'], {}, 2, None, ["UTF-8", "0xff"]),
    ("bom_not_at_start", [OK, b"\xef\xbb\xbf" + json.dumps(OK).encode()], {}, 2, None, ["not valid JSON"]),
    ("missing_close", [{"prompt": "p", "choosen": "c", "rejected": "r"}], {}, 1, "chosen",
     ["is missing (did you mean 'choosen'? pass --chosen-column choosen)"]),
    ("missing_far", [{"prompt": "p", "chosen": "c"}], {}, 1, "rejected", ["pass --rejected-column NAME"]),
    ("missing_id_column", [OK], {"id_column": "uid"}, 1, "uid", ["--id-column"]),
    ("wrong_type", [{**OK, "chosen": 5}], {}, 1, "chosen",
     ["must be a string or a list of {role, content} messages, got int"]),
    ("null_prompt", [{**OK, "prompt": None}], {}, 1, "prompt", ["got null"]),
    ("message_not_object", [{**OK, "prompt": ["hi"], "chosen": msgs(("a", "c")), "rejected": msgs(("a", "r"))}],
     {}, 1, "prompt[0]", ["got string"]),
    ("message_no_role", [{**OK, "prompt": [{"content": "x"}], "chosen": msgs(("a", "c")),
                          "rejected": msgs(("a", "r"))}], {}, 1, "prompt[0].role", ["is missing"]),
    ("content_not_string", [{**OK, "prompt": msgs(("u", "x")), "chosen": [{"role": "a", "content": 5}],
                             "rejected": msgs(("a", "r"))}], {}, 1, "chosen[0].content", ["got int"]),
    ("empty_prompt", [OK, {**OK, "prompt": ""}], {}, 2, "prompt", ["is empty"]),
    ("blank_prompt", [{**OK, "prompt": " \n\t"}], {}, 1, "prompt", ["whitespace-only"]),
    ("empty_list", [{"prompt": msgs(("u", "x")), "chosen": msgs(("a", "c")), "rejected": []}], {}, 1,
     "rejected", ["empty list"]),
    ("mixed_rejected", [{**OK, "rejected": msgs(("a", "r"))}], {}, 1, "rejected",
     ["is a message list but 'chosen' is a string"]),
    ("mixed_prompt", [{"prompt": "p", "chosen": msgs(("a", "c")), "rejected": msgs(("a", "r"))}], {}, 1,
     "prompt", ["is a string but 'chosen' is a message list"]),
    ("implicit_no_prefix", [{"chosen": "yes", "rejected": "no"}], {}, 1, "prompt",
     ["share no common prefix"]),
    ("implicit_messages_no_prefix", [{"chosen": msgs(("a", "c")), "rejected": msgs(("a", "r"))}], {}, 1,
     "prompt", ["share no common prefix"]),
    ("too_large", [OK, {**OK, "chosen": "x" * 200}], {"max_row_bytes": 100}, 2, None,
     ["larger than max_row_bytes (100 bytes)"]),
    ("bad_id_type", [{**OK, "id": 1.5}], {}, 1, "id", ["non-empty string or an int, got float"]),
    ("bool_id", [{**OK, "id": True}], {}, 1, "id", ["got bool"]),
    ("empty_id", [{**OK, "id": " "}], {}, 1, "id", ['got string " "']),
    ("duplicate_id", [{**OK, "id": "a"}, {**OK, "id": "b"}, {**OK, "id": "a"}], {}, 3, "id",
     ["duplicate id 'a'", "bad.jsonl:1)"]),
]


@pytest.mark.parametrize("lines, kwargs, row, field, fragments",
                         [case[1:] for case in JSONL_CASES], ids=[case[0] for case in JSONL_CASES])
def test_jsonl_errors_name_file_row_field(tmp_path, lines, kwargs, row, field, fragments):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DpocliError) as excinfo:
        read_examples(path, **kwargs)
    assert_one_line_error(excinfo, f"{path}:{row}", field, *fragments)
    assert (excinfo.value.file, excinfo.value.row, excinfo.value.field) == (str(path), row, field)


def test_too_large_line_without_newline_at_end(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"x": "' + b"y" * 500)
    with pytest.raises(DpocliError) as excinfo:
        read_examples(path, max_row_bytes=100)
    assert_one_line_error(excinfo, f"{path}:1", None, "max_row_bytes")
    assert excinfo.value.hint and "--max-row-bytes" not in excinfo.value.hint  # no such flag exists


def test_duplicate_id_across_files_names_both(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{**OK, "id": "x"}])
    write_jsonl(tmp_path / "b.jsonl", [OK, {**OK, "id": "x"}])
    with pytest.raises(DpocliError) as excinfo:
        read_examples(tmp_path)
    assert_one_line_error(excinfo, f"{tmp_path / 'b.jsonl'}:2", "id", f"{tmp_path / 'a.jsonl'}:1")


def test_parquet_missing_column_suggests_flag(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["c"], "rejectd": ["r"]}), path)
    with pytest.raises(DpocliError) as excinfo:
        read_examples(path)
    assert_one_line_error(excinfo, str(path), "rejected", "did you mean 'rejectd'? pass --rejected-column rejectd")
    with pytest.raises(DpocliError) as excinfo:
        read_examples(path, rejected_column="rejectd", id_column="uid")
    assert_one_line_error(excinfo, str(path), "uid", "--id-column")


def test_parquet_row_errors_name_the_row(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["p", "", "r"], "chosen": ["c", "d", "e"], "rejected": ["x", "y", "z"]}),
                   path)
    with pytest.raises(DpocliError) as excinfo:
        read_examples(path)
    assert_one_line_error(excinfo, f"{path}:2", "prompt", "is empty")
    msg_path = tmp_path / "msg.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": msgs(("u", "p")), "chosen": msgs(("a", "c")),
                                          "rejected": [{"role": None, "content": "r"}]}]), msg_path)
    with pytest.raises(DpocliError) as excinfo:
        read_examples(msg_path)
    assert_one_line_error(excinfo, f"{msg_path}:1", "rejected[0].role", "is missing")
    with pytest.raises(DpocliError) as excinfo:
        read_examples(path, max_row_bytes=2)
    assert_one_line_error(excinfo, f"{path}:1", None, "max_row_bytes")


@pytest.mark.parametrize("damage", ["truncate", "not_parquet"])
def test_corrupt_parquet(tmp_path, damage):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["p"] * 50, "chosen": ["c"] * 50, "rejected": ["r"] * 50}), path)
    path.write_bytes(path.read_bytes()[:-20] if damage == "truncate" else b'{"prompt": "p"}\n')
    with pytest.raises(DpocliError) as excinfo:
        read_examples(path)
    assert_one_line_error(excinfo, str(path), None, "is not a readable Parquet file")


def test_missing_path(tmp_path):
    with pytest.raises(DpocliError) as excinfo:
        read_examples(tmp_path / "nope.jsonl")
    assert_one_line_error(excinfo, str(tmp_path / "nope.jsonl"), None, "does not exist")


def test_folder_without_data_files(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DpocliError) as excinfo:
        read_examples(tmp_path)
    assert_one_line_error(excinfo, str(tmp_path), None, "no .jsonl, .parquet or .arrow")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text("[]")
    with pytest.raises(DpocliError) as excinfo:
        read_examples(path)
    assert_one_line_error(excinfo, str(path), None, "not a JSON Lines (.jsonl) or Parquet")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf\n"])
def test_empty_input(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DpocliError) as excinfo:
        read_examples(path)
    assert_one_line_error(excinfo, str(path), None, "has no rows")


def test_all_rows_dropped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DpocliError) as excinfo:
        read_examples(path, drop_identical=True)
    assert_one_line_error(excinfo, str(path), None, "dropped")


def test_example_is_frozen():
    """Tokenization and error messages share the rows read once: no stage may rewrite a field."""
    ex = Example("i", 0, "p", "c", "r", False, "f.jsonl", 1)
    before = dataclasses.astuple(ex)
    for f in dataclasses.fields(Example):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(ex, f.name, None)
    assert dataclasses.astuple(ex) == before
    changed = dataclasses.replace(ex, chosen="c2")  # a changed copy is the only way to change one
    assert (changed.chosen, ex.chosen) == ("c2", "c")
