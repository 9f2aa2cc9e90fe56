"""One copy of the cache per node (dpocli/scoring/shared_cache.py): the memory-mapped rows equal the
privately loaded ones bit for bit, nothing is left in TMPDIR, and two ranks that map the cache hold
a fraction of the private memory that two private loads hold (bench/cache_memory.py)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import MODEL, invoke, read_jsonl
from dpocli.cache import store as cache
from dpocli.errors import DpocliError
from dpocli.model.distributed import DistContext
from dpocli.scoring import shared_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import cache_memory  # noqa: E402


@pytest.fixture
def tmpdir_for_spills(tmp_path, monkeypatch) -> Path:
    """TMPDIR for this test only (tempfile caches the folder it found first)."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def assert_same_data(a: cache.CacheData, b: cache.CacheData) -> None:
    assert a.num_rows == b.num_rows and a.ids == b.ids and a.shard_rows() == b.shard_rows()
    pairs = [(a.source_row, b.source_row), (a.shard, b.shard), (a.shard_position, b.shard_position)]
    pairs += [(a.scalars[k], b.scalars[k]) for k in a.scalars]
    assert a.lists.keys() == b.lists.keys()
    pairs += [(x, y) for k in a.lists for x, y in zip(a.lists[k], b.lists[k], strict=True)]
    for x, y in pairs:
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_mapped_rows_equal_the_private_load_and_leave_nothing(tmp_path, tmpdir_for_spills, monkeypatch):
    # Several shards, rows stored out of source order: the mapped copy keeps CacheData's order.
    monkeypatch.setattr(cache_memory, "ROWS_PER_SHARD", 64)
    cache_memory.build_cache(tmp_path / "c", 300, 40)
    expected_manifest, expected = cache.load_cache(tmp_path / "c")
    monkeypatch.setenv(shared_cache.ENV, "1")
    manifest, data = shared_cache.load_cache(tmp_path / "c", dist=DistContext())
    assert manifest == expected_manifest
    assert_same_data(data, expected)
    values = data.lists["chosen_ids"][0]
    assert not values.flags.writeable and not values.flags.owndata  # a view of the mapped file
    assert list(tmpdir_for_spills.iterdir()) == []  # unlinked once mapped


def test_small_caches_in_one_process_stay_private(monkeypatch):
    monkeypatch.delenv(shared_cache.ENV, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert shared_cache.maps_cache(DistContext(0, 2, 0))
    assert not shared_cache.maps_cache(DistContext())  # one process: nobody to share with
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert not shared_cache.maps_cache(DistContext(0, 2, 0))  # one rank per node
    monkeypatch.setenv(shared_cache.ENV, "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not shared_cache.maps_cache(DistContext(0, 2, 0))
    monkeypatch.setenv(shared_cache.ENV, "1")
    assert shared_cache.maps_cache(DistContext())


def test_a_tmpdir_without_room_is_an_error_line(small_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    monkeypatch.setenv(shared_cache.ENV, "1")
    with pytest.raises(DpocliError) as err:
        shared_cache.load_cache(small_cache, dist=DistContext())
    assert "memory-mapped copy" in str(err.value) and "TMPDIR" in err.value.hint


def test_train_and_eval_are_bit_identical_on_the_mapped_cache(small_cache, tmp_path, tmpdir_for_spills,
                                                              monkeypatch):
    args = ["--model", MODEL, "--max-steps", 3, "--batch-size", 8, "--lr", "1e-3", "--quiet",
            "--eval-cache", small_cache, "--eval-every", 2]
    runs, evals = {}, {}
    for forced in ("0", "1"):
        monkeypatch.setenv(shared_cache.ENV, forced)
        out = tmp_path / f"run{forced}"
        assert invoke(["train", small_cache, "--out", out, *args]).exit_code == 0
        runs[forced] = out
        result = invoke(["eval", small_cache, "--model", out, "--json", "--quiet"])
        assert result.exit_code == 0, result.stderr
        evals[forced] = json.loads(result.stdout)["models"][0]
    def numbers(record: dict) -> dict:  # without wall-clock figures (and the run's own path)
        return {k: v for k, v in record.items()
                if not (k.endswith("_s") or "per_second" in k or "runtime" in k or k == "model")}

    rows = [[numbers(r) for r in read_jsonl(runs[f] / "metrics.jsonl")] for f in ("0", "1")]
    assert rows[0] == rows[1] and len(rows[0]) >= 3
    a, b = load_file(runs["0"] / "model.safetensors"), load_file(runs["1"] / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)
    assert numbers(evals["0"]) == numbers(evals["1"])
    assert list(tmpdir_for_spills.iterdir()) == []


@pytest.mark.slow
@pytest.mark.memory  # a separate CI step: pytest -m "memory or bench"
def test_two_ranks_map_one_copy_instead_of_two_private_ones(tmp_path):
    """8M ids (tens of MB): each rank's private memory per token, two ranks under torchrun.
    Loading privately (dpocli before issue 15 item 4, or DPOCLI_CACHE_MMAP=0), each rank holds
    the arrays itself: about 5 bytes per token. Mapped, the ranks share one copy of the file's
    pages and keep the row ids; the writer (local rank 0) also keeps some of its freed load."""
    figures = cache_memory.run(16000, 500, 2, tmp_path)
    print(figures)
    private = [r["private"] for r in figures["private_load"]]
    mapped = [r["private"] for r in figures["mapped"]]
    assert min(private) >= 3.5  # the arrays alone are 4 bytes per token
    assert max(mapped) <= 0.5 * min(private)
    assert max(mapped[1:]) <= 0.5  # a rank that did not write the copy keeps only the ids
    # The mapped pages are counted once per node: each of 2 ranks carries half of them in Pss.
    assert all(r["shared"] <= 0.6 * min(private) for r in figures["mapped"])
