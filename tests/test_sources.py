"""Inputs laid out like a Hub dataset (dpocli.data.sources): one split is read, splits are never merged,
and files of another split are never opened. A file of the split not asked for is made unreadable
(garbage bytes), so reading it would fail the test."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import MODEL, invoke, write_jsonl
from dpocli.data.examples import read_examples
from dpocli.data.sources import resolve_input
from dpocli.errors import DpocliError


def rows(tag: str, n: int = 2) -> list[dict]:
    return [{"id": f"{tag}-{i}", "prompt": f"{tag} question {i}?", "chosen": " yes", "rejected": " no"}
            for i in range(n)]


def parquet(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(data), path)
    return path


def jsonl(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, data)


def poison(path):
    """A file that fails to parse if anyone opens it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00not a data file\xff")
    return path


def ids(path, **kw):
    return [e.id for e in read_examples(path, **kw).examples]


def test_split_named_files_in_one_folder(tmp_path):
    parquet(tmp_path / "train-00000-of-00002.parquet", rows("a"))
    parquet(tmp_path / "train-00001-of-00002.parquet", rows("b"))
    poison(tmp_path / "test-00000-of-00001.parquet")
    result = read_examples(tmp_path)
    assert [e.id for e in result.examples] == ["a-0", "a-1", "b-0", "b-1"] and result.split == "train"
    assert [f.path.rsplit("/", 1)[1] for f in result.files] == ["train-00000-of-00002.parquet",
                                                               "train-00001-of-00002.parquet"]
    poison(tmp_path / "train-00000-of-00002.parquet")
    parquet(tmp_path / "test-00000-of-00001.parquet", rows("t"))
    assert ids(tmp_path, split="test") == ["t-0", "t-1"]


def test_data_subfolder_and_split_aliases(tmp_path):
    jsonl(tmp_path / "data" / "train.jsonl", rows("tr"))
    jsonl(tmp_path / "data" / "dev.jsonl", rows("dev"))
    poison(tmp_path / "data" / "test.jsonl")
    assert ids(tmp_path) == ["tr-0", "tr-1"]
    # The Hub's keywords: "dev" is the validation split, asked for by either name.
    assert ids(tmp_path, split="validation") == ids(tmp_path, split="dev") == ["dev-0", "dev-1"]
    assert resolve_input(tmp_path, "validation").layout == "split-files"


def test_split_subfolders(tmp_path):
    parquet(tmp_path / "train" / "part-0.parquet", rows("tr"))
    poison(tmp_path / "test" / "part-0.parquet")
    assert ids(tmp_path) == ["tr-0", "tr-1"]


def test_readme_configs(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train_prefs\n    path: data/train_prefs-*\n"
        "  - split: test_prefs\n    path: data/test_prefs-*\n---\n# UltraFeedback-like\n")
    parquet(tmp_path / "data" / "train_prefs-00000-of-00001.parquet", rows("tp"))
    poison(tmp_path / "data" / "test_prefs-00000-of-00001.parquet")
    assert ids(tmp_path, split="train_prefs") == ["tp-0", "tp-1"]
    with pytest.raises(DpocliError) as err:
        read_examples(tmp_path)  # default "train" is not one of this README's splits
    assert str(err.value) == (f"{tmp_path}: field '--split' has no split 'train' (splits found: test_prefs, "
                              "train_prefs)")


def test_readme_data_files_without_split_is_train(tmp_path):
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: default\n"
                                        "  data_files: prefs/*.jsonl\n---\n")
    jsonl(tmp_path / "prefs" / "x.jsonl", rows("x"))
    poison(tmp_path / "stray.jsonl")  # not matched by the README's pattern
    assert ids(tmp_path) == ["x-0", "x-1"]


def test_readme_with_several_configs_and_no_default_is_refused(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: a\n  data_files: a.jsonl\n"
        "- config_name: b\n  data_files: b.jsonl\n---\n")
    with pytest.raises(DpocliError, match="lists several configs \\(a, b\\) and none is the default"):
        read_examples(tmp_path)


def test_subset_picks_a_readme_config_by_name(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: a\n  data_files: a/*.jsonl\n"
        "- config_name: b\n  data_files:\n  - split: train\n    path: b/train.jsonl\n"
        "  - split: test\n    path: b/test.jsonl\n---\n")
    poison(tmp_path / "a" / "x.jsonl")  # config a is never opened when b is asked for
    jsonl(tmp_path / "b" / "train.jsonl", rows("b"))
    jsonl(tmp_path / "b" / "test.jsonl", rows("bt"))
    assert ids(tmp_path, subset="b") == ["b-0", "b-1"]
    assert ids(tmp_path, subset="b", split="test") == ["bt-0", "bt-1"]
    with pytest.raises(DpocliError) as err:
        read_examples(tmp_path, subset="c")
    assert str(err.value) == f"{tmp_path / 'README.md'}: field '--subset' lists no config 'c' (configs: a, b)"
    assert err.value.hint == "pass --subset with one of the configs listed"
    with pytest.raises(DpocliError) as err:
        read_examples(tmp_path)
    assert err.value.hint == "pass --subset with the config you want"


def test_subset_without_readme_configs_is_refused(tmp_path):
    jsonl(tmp_path / "train.jsonl", rows("t"))
    for path in (tmp_path, tmp_path / "train.jsonl"):
        with pytest.raises(DpocliError) as err:
            read_examples(path, subset="a")
        assert str(err.value) == (f"{path}: field '--subset' has no README.md with configs, so --subset a "
                                  "cannot be honoured")


def _save_split(folder, data):
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(data)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}
    (folder / "state.json").write_text(json.dumps(state))


def test_save_to_disk_dataset_dict(tmp_path):
    _save_split(tmp_path / "train", rows("tr", 3))
    poison(tmp_path / "test" / "data-00000-of-00001.arrow")
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert ids(tmp_path) == ["tr-0", "tr-1", "tr-2"]
    with pytest.raises(DpocliError, match="has no split 'validation' \\(splits found: test, train\\)"):
        read_examples(tmp_path, split="validation")


def test_real_dataset_dict_save_to_disk_when_installed(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("tr")),
                          "test": datasets.Dataset.from_list(rows("te"))}).save_to_disk(str(tmp_path / "dd"))
    assert ids(tmp_path / "dd") == ["tr-0", "tr-1"] and ids(tmp_path / "dd", split="test") == ["te-0", "te-1"]


def test_unnamed_files_keep_todays_behaviour(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", rows("a"))
    parquet(tmp_path / "b.parquet", rows("b"))
    result = read_examples(tmp_path)
    assert [e.id for e in result.examples] == ["a-0", "a-1", "b-0", "b-1"] and result.split is None
    with pytest.raises(DpocliError, match="field '--split' has no splits, so --split test cannot be "
                                          "honoured"):
        read_examples(tmp_path, split="test")
    with pytest.raises(DpocliError, match="has no splits"):
        read_examples(tmp_path / "a.jsonl", split="test")


def test_split_named_and_unnamed_files_together_are_refused(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows("a"))
    write_jsonl(tmp_path / "extra.jsonl", rows("b"))
    with pytest.raises(DpocliError, match=r"mixes files named by split \(train\) with files that name none "
                                          r"\(extra.jsonl\)"):
        read_examples(tmp_path)


@pytest.mark.parametrize("name, split", [("train-00000-of-00001.parquet", "train"), ("test.jsonl", "test"),
                                         ("my_valid_set.jsonl", "validation"), ("constraint.jsonl", None),
                                         ("data-00000-of-00001.arrow", None), ("eval2.jsonl", "test")])
def test_split_from_file_name(tmp_path, name, split):
    poison(tmp_path / name)  # only the name is looked at
    source = resolve_input(tmp_path, split or "train")
    assert source.split == split


def test_precompute_reads_one_split_and_records_it(tmp_path):
    folder = tmp_path / "hub"
    parquet(folder / "data" / "train-00000-of-00001.parquet", rows("tr", 3))
    parquet(folder / "data" / "test-00000-of-00001.parquet", rows("te", 2))
    out = tmp_path / "cache"
    result = invoke(["precompute-ref", folder, "--model", MODEL, "--out", out, "--split", "test",
                     "--quiet", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rows_written"] == 2
    spec_input = json.loads((out / "manifest.json").read_text())["spec"]["input"]
    assert spec_input["split"] == "test"
    assert [f["path"].rsplit("/", 1)[1] for f in spec_input["files"]] == ["test-00000-of-00001.parquet"]
    missing = invoke(["precompute-ref", folder, "--model", MODEL, "--out", tmp_path / "c2", "--split", "dev"])
    assert missing.exit_code == 2
    assert "has no split 'validation' (splits found: test, train)" in missing.stderr
    assert not (tmp_path / "c2").exists()
