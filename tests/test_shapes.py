"""Dataset shapes people actually have: Anthropic-HH transcripts, UltraFeedback-binarized rows, and
an HF `datasets.save_to_disk` folder, each read and tokenized end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import MODEL, invoke
from dpocli.data.examples import read_examples

SHAPES = Path(__file__).parent / "fixtures" / "shapes"


def test_anthropic_hh_transcripts_get_their_implicit_prompt():
    result = read_examples(SHAPES / "anthropic_hh.jsonl")
    first, second = result.examples
    assert first.prompt == "\n\nHuman: What is the capital of France?\n\nAssistant:"
    assert first.chosen == " The capital of France is Paris."
    assert first.rejected == " I don't know, look it up."
    assert second.prompt.endswith("\n\nHuman: Tell me a joke\n\nAssistant:")  # multi-turn
    assert second.rejected == " No."


def test_ultrafeedback_rows_use_the_repeated_prompt_turn():
    first = read_examples(SHAPES / "ultrafeedback_binarized.jsonl").examples[0]
    assert first.conversational
    assert first.prompt == [{"role": "user", "content": "Write a haiku about rain."}]
    assert first.chosen[0]["role"] == "assistant" and len(first.chosen) == 1
    assert first.rejected == [{"role": "assistant", "content": "Rain is wet."}]


def test_ultrafeedback_row_whose_messages_do_not_repeat_the_prompt_is_refused(tmp_path):
    row = {"prompt": "Something else", "chosen": [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Yes"}],
           "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No"}]}
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps(row) + "\n")
    from dpocli.errors import DpocliError
    with pytest.raises(DpocliError, match="uf.jsonl:1"):
        read_examples(path)


def _save_to_disk_like(folder: Path, rows: list[dict]) -> None:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream shards + JSON metadata."""
    folder.mkdir()
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=3)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")


def test_hf_save_to_disk_folder_is_read_without_the_datasets_package(tmp_path, sample_rows):
    rows = [r for r in sample_rows[:10] if isinstance(r["prompt"], str)]
    _save_to_disk_like(tmp_path / "hf", rows)
    result = read_examples(tmp_path / "hf")
    assert [e.id for e in result.examples] == [r["id"] for r in rows]
    assert result.examples[2].chosen == rows[2]["chosen"]


def test_real_datasets_save_to_disk_when_installed(tmp_path, sample_rows):
    datasets = pytest.importorskip("datasets")
    rows = [r for r in sample_rows[:8] if isinstance(r["prompt"], str)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    assert [e.id for e in read_examples(tmp_path / "hf").examples] == [r["id"] for r in rows]


def test_shapes_run_through_precompute(tmp_path):
    for name in ("anthropic_hh", "ultrafeedback_binarized"):
        out = tmp_path / name
        result = invoke(["precompute-ref", SHAPES / f"{name}.jsonl", "--model", MODEL, "--out", out,
                         "--quiet", "--json"])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["rows_written"] == 2
