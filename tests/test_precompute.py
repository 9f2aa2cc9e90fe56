"""Tests for stage 1 (`dpo precompute-ref`), run through the CLI in-process.

Expected values: the cached sums are recomputed token by token with plain transformers (one
unpadded sequence at a time); invariances (batch size, row order, resume) compare two runs by row
id; bad input is checked against the file, row and field the test planted the problem in.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from conftest import MODEL, invoke, read_jsonl, write_jsonl
from dpocli.cache import store as cache
from dpocli.cache.store import load_cache, read_manifest
from dpocli.data.examples import Example
from dpocli.data.tokenization import tokenize_pair

TOL = 1e-5


# torch runs single-threaded for the whole session (conftest.py).


# --- helpers and local fixtures ---

def precompute(inp, out, *extra):
    return invoke(["precompute-ref", inp, "--model", MODEL, "--out", out, *extra])


def by_id(cache_dir) -> dict[str, dict]:
    _, data = load_cache(cache_dir)
    rows = {}
    for i, row_id in enumerate(data.ids):
        rows[row_id] = {"chosen": float(data.scalars["ref_chosen_logps"][i]),
                        "rejected": float(data.scalars["ref_rejected_logps"][i]),
                        "ids": [data.row_list(n, i).tolist() for n in cache.ID_COLUMNS]}
    return rows


def assert_same_values(a: dict, b: dict, tol=TOL) -> None:
    assert a.keys() == b.keys()
    for row_id in a:
        assert a[row_id]["ids"] == b[row_id]["ids"], row_id
        assert abs(a[row_id]["chosen"] - b[row_id]["chosen"]) <= tol, row_id
        assert abs(a[row_id]["rejected"] - b[row_id]["rejected"]) <= tol, row_id


def files_of(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def error_line(result) -> str:
    """The single `error:` line on stderr (a `hint:` line may follow)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_prefs(tmp_path_factory, sample_rows):
    """16 rows (12 standard, 4 conversational, not in small_prefs) for runs that need several caches."""
    rest = sample_rows[48:]
    rows = ([r for r in rest if isinstance(r["chosen"], str)][:12]
            + [r for r in rest if isinstance(r["chosen"], list)][:4])
    random.Random(1).shuffle(rows)
    assert len(rows) == 16
    return write_jsonl(tmp_path_factory.mktemp("tiny") / "tiny.jsonl", rows)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_prefs):
    """tiny_prefs in 3 shards (6 + 6 + 4 rows), never modified (tests copy it first)."""
    out = tmp_path_factory.mktemp("tiny-caches") / "cache"
    result = precompute(tiny_prefs, out, "--rows-per-shard", 6, "--quiet")
    assert result.exit_code == 0, result.stderr
    return out


def naive_sum(model, prompt_ids, completion_ids) -> float:
    """Token-by-token sum for one unpadded sequence (log_softmax in fp64; see test_logprobs.py)."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(len(prompt_ids), ids.shape[1]))


# --- values ---

def test_cached_values_equal_token_by_token_recomputation(small_cache, sample_rows, model, tokenizer):
    manifest, data = load_cache(small_cache)
    assert manifest.complete and data.num_rows == 48 and len(manifest.shards) == 3
    rows = {r["id"]: r for r in sample_rows[:48]}
    assert data.ids == [r["id"] for r in sample_rows[:48]]  # ordered by source row
    worst = 0.0
    for i, row_id in list(enumerate(data.ids))[::2]:  # every other row: 24 pairs, both formats
        prompt, chosen, rejected = (data.row_list(n, i).tolist() for n in cache.ID_COLUMNS)
        row = rows[row_id]
        pair = tokenize_pair(Example(row_id, i, row["prompt"], row["chosen"], row["rejected"],
                                     isinstance(row["chosen"], list), "f", i + 1), tokenizer, 1024)
        assert (prompt, chosen, rejected) == (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)
        assert data.scalars["chosen_len"][i] == len(chosen)
        assert data.scalars["rejected_len"][i] == len(rejected)
        for column, completion in (("ref_chosen_logps", chosen), ("ref_rejected_logps", rejected)):
            diff = abs(float(data.scalars[column][i]) - naive_sum(model, prompt, completion))
            worst = max(worst, diff)
    assert worst <= TOL, worst


@pytest.mark.parametrize("batching", [["--batch-size", "1"], ["--batch-size", "8"], ["--max-tokens", "300"]])
def test_values_do_not_depend_on_batching(tmp_path, tiny_prefs, tiny_cache, batching):
    # tiny_cache used the default (--max-tokens 16384: all 16 pairs in one padded batch).
    out = tmp_path / "cache"
    result = precompute(tiny_prefs, out, *batching, "--rows-per-shard", 6, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert_same_values(by_id(out), by_id(tiny_cache))
    # Batching is not part of the spec: the same cache identity.
    assert read_manifest(out).spec_fingerprint == read_manifest(tiny_cache).spec_fingerprint


def test_values_do_not_depend_on_row_order(tmp_path, sample_rows, small_cache):
    rows = list(sample_rows[:48])
    random.Random(0).shuffle(rows)
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows)
    out = tmp_path / "cache"
    result = precompute(shuffled, out, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert_same_values(by_id(out), by_id(small_cache))
    _, data = load_cache(out)
    assert data.ids == [r["id"] for r in rows]  # source_row follows the shuffled file


def test_token_logps_sum_to_the_summed_columns(tmp_path, tiny_prefs, tiny_cache):
    out = tmp_path / "cache"
    result = precompute(tiny_prefs, out, "--token-logps", "--batch-size", 3, "--quiet")
    assert result.exit_code == 0, result.stderr
    manifest, data = load_cache(out)
    assert manifest.spec["token_logps"] is True
    for i in range(data.num_rows):
        for side in ("chosen", "rejected"):
            tokens = data.row_list(f"ref_{side}_token_logps", i)
            assert tokens.shape == (int(data.scalars[f"{side}_len"][i]),)
            assert (tokens < 0).all()
            assert abs(float(tokens.astype("float64").sum()) - float(data.scalars[f"ref_{side}_logps"][i])) < 1e-9
    assert_same_values(by_id(out), by_id(tiny_cache))


# --- resume and idempotence ---

@pytest.mark.parametrize("target,error,k", [("write_shard", KeyboardInterrupt, 1),
                                            ("write_shard", RuntimeError, 2),
                                            ("commit_manifest", KeyboardInterrupt, 1)])
def test_interrupted_run_resumes_to_identical_cache(tmp_path, monkeypatch, tiny_prefs, tiny_cache,
                                                    target, error, k):
    """Fail on the (k+1)-th call of `target`, rerun the same command: the shards are byte-identical
    to an uninterrupted run's, and only the shards not listed in the manifest are scored.

    Failing in commit_manifest leaves shard k written but unlisted (a crash between the rename and
    the manifest commit): it must be redone, not trusted. (The first commit_manifest call is the
    empty manifest that claims the folder before any shard is written.)"""
    real_write, calls, failing = cache.write_shard, [], []

    def fail_on_call(real):
        def wrapper(*args, **kwargs):
            failing.append(1)
            if len(failing) == k + 1 + (target == "commit_manifest"):
                raise error("simulated crash")
            return real(*args, **kwargs)
        return wrapper

    out = tmp_path / "cache"
    args = ("--rows-per-shard", 6, "--quiet", "--json")
    monkeypatch.setattr(cache, target, fail_on_call(getattr(cache, target)))
    if error is KeyboardInterrupt:
        result = precompute(tiny_prefs, out, *args)
        assert result.exit_code == 130 and "interrupted" in result.stderr and result.stdout == ""
    else:  # an unexpected exception is a bug: one `error:` line, exit 1, no traceback
        result = precompute(tiny_prefs, out, *args)
        assert result.exit_code == 1 and "internal error (RuntimeError: simulated crash)" in result.stderr
        assert "Traceback" not in result.stderr
    monkeypatch.undo()

    # The interrupted folder: k listed shards (plus the unlisted one), and readers refuse it.
    manifest = read_manifest(out)
    assert not manifest.complete and [s["index"] for s in manifest.shards] == list(range(k))
    on_disk = k + (target == "commit_manifest")
    assert set(files_of(out)) == {"manifest.json"} | {cache.shard_name(i) for i in range(on_disk)}
    with pytest.raises(cache.DpocliError, match="incomplete"):
        load_cache(out)
    info = invoke(["cache", "info", out, "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["complete"] is False

    def counting_write(*args, **kwargs):
        calls.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(cache, "write_shard", counting_write)
    result = precompute(tiny_prefs, out, *args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "resumed" and summary["rows_written"] == 16
    assert calls == list(range(k, 3))  # the listed shards were not redone

    shards = {name: b for name, b in files_of(out).items() if name.endswith(".parquet")}
    expected = {name: b for name, b in files_of(tiny_cache).items() if name.endswith(".parquet")}
    assert shards == expected  # byte-identical to the uninterrupted run
    assert read_manifest(out).shards == read_manifest(tiny_cache).shards
    assert read_manifest(out).spec_fingerprint == read_manifest(tiny_cache).spec_fingerprint
    assert_same_values(by_id(out), by_id(tiny_cache), tol=0.0)


def test_rerun_of_complete_cache_is_a_no_op(small_prefs, small_cache):
    before = files_of(small_cache)
    # Same arguments as the conftest run, except batching, which does not change the spec.
    result = precompute(small_prefs, small_cache, "--rows-per-shard", 16, "--batch-size", 3, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "already_complete"
    assert summary["completion_tokens_scored"] == 0 and summary["rows_written"] == 48
    assert summary["spec_fingerprint"] == read_manifest(small_cache).spec_fingerprint
    assert "already complete" in result.stderr
    assert files_of(small_cache) == before


@pytest.mark.parametrize("extra,field", [(["--max-length", "512"], "max_length"),
                                         (["--token-logps"], "token_logps"),
                                         (["--rows-per-shard", "5"], "rows_per_shard")])
def test_different_arguments_are_refused_unless_overwrite(tmp_path, tiny_prefs, tiny_cache, extra, field):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    before = files_of(out)
    base = ["--rows-per-shard", 6] if field != "rows_per_shard" else []
    result = precompute(tiny_prefs, out, *base, *extra, "--quiet")
    assert result.exit_code == 2
    line = error_line(result)
    assert str(out) in line and f"{field}:" in line and "already holds a cache" in line
    assert "--overwrite" in result.stderr  # the hint
    assert result.stdout == "" and files_of(out) == before

    if field == "max_length":  # one --overwrite run is enough to show it replaces the cache
        result = precompute(tiny_prefs, out, *base, *extra, "--overwrite", "--quiet", "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["status"] == "complete"
        assert read_manifest(out).spec["max_length"] == 512
        assert_same_values(by_id(out), by_id(tiny_cache))  # no row is long enough to be cut


def test_foreign_folder_is_refused(tmp_path, tiny_prefs):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = precompute(tiny_prefs, out, "--quiet")
    assert result.exit_code == 2 and "not a dpocli cache" in error_line(result)
    assert files_of(out) == {"notes.txt": b"mine"}


# --- output streams ---

def test_json_stdout_is_one_object_and_logs_go_to_stderr(tmp_path, monkeypatch, tiny_prefs):
    import dpocli.precompute.run as precompute_module
    real = precompute_module.weights_fingerprint

    def noisy(*args, **kwargs):
        print("a stray print from a dependency")  # must not reach stdout
        return real(*args, **kwargs)

    monkeypatch.setattr(precompute_module, "weights_fingerprint", noisy)
    # A pair with chosen == rejected is kept with a warning: a log line that must go to stderr.
    rows = read_jsonl(tiny_prefs)[:6] + [{"id": "same", "prompt": "Q?\nAnswer:", "chosen": " A", "rejected": " A"}]
    inp = write_jsonl(tmp_path / "p.jsonl", rows)
    result = precompute(inp, tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)  # one object: tests/test_cli.py checks that for every command
    assert summary["command"] == "precompute-ref" and summary["status"] == "complete"
    assert summary["rows_read"] == summary["rows_written"] == 7
    assert "a stray print" in result.stderr and "identical" in result.stderr

    table = precompute(inp, tmp_path / "cache")  # human summary: stdout, no JSON
    assert table.exit_code == 0 and "already_complete" in table.stdout
    assert "already complete" in table.stderr and "already complete" not in table.stdout.replace("already_complete", "")


def test_cache_info_json(small_cache):
    result = invoke(["cache", "info", small_cache, "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["command"] == "cache info" and info["complete"] is True
    assert (info["rows_read"], info["rows_written"], info["rows_dropped"]) == (48, 48, {})
    assert (info["shards"], info["planned_shards"]) == (3, 3)
    assert info["spec_fingerprint"] == read_manifest(small_cache).spec_fingerprint
    assert info["length_stats"]["prompt"]["min"] >= 1


# --- bad input: exit 2, one line naming file, row and field, no output folder ---

LONG_PROMPT = "Please read this. " * 100 + "\nAnswer:"  # well over 200 tokens
GOOD = {"prompt": "What is 2+2?\nAnswer:", "chosen": " 4", "rejected": " 5"}


def bad_file(tmp_path, bad_line: str):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, prompt="Hi\nAnswer:")) + "\n"
                    + bad_line + "\n")
    return path


@pytest.mark.parametrize("case,bad_line,field,extra", [
    ("invalid_json", '{"prompt": "a", "chosen": "b", ', None, []),
    ("missing_column", json.dumps({"prompt": "a", "chosen": " b"}), "rejected", []),
    ("wrong_type", json.dumps({"prompt": "a", "chosen": 5, "rejected": " c"}), "chosen", []),
    ("wrong_message", json.dumps({"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "x"}],
                                  "rejected": [{"role": "assistant", "content": "y"}]}), "prompt[0].content", []),
    ("empty_prompt", json.dumps({"prompt": " ", "chosen": " b", "rejected": ""}), "prompt", ["--strict"]),
    ("prompt_too_long", json.dumps(dict(GOOD, prompt=LONG_PROMPT)), "prompt", ["--strict", "--max-length", "64"]),
])
@pytest.mark.parametrize("out_exists", [False, True])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, case, bad_line, field, extra, out_exists):
    path = bad_file(tmp_path, bad_line)
    out = tmp_path / "cache"
    if out_exists:
        out.mkdir()
    result = precompute(path, out, *extra, "--json")
    assert result.exit_code == 2, (case, result.stderr)
    assert result.stdout == ""
    line = error_line(result)
    assert f"{path}:3: " in line, line
    if field:
        assert f"field '{field}'" in line, line
    assert "Traceback" not in result.stderr
    if out_exists:
        assert list(out.iterdir()) == []
    else:
        assert not out.exists()


def test_long_prompt_is_dropped_and_counted_without_strict(tmp_path, tiny_prefs):
    rows = read_jsonl(tiny_prefs)[:5]
    rows.insert(2, {"id": "too-long", **dict(GOOD, prompt=LONG_PROMPT)})
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "cache"
    result = precompute(path, out, "--max-length", 200, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows_read"] == 6 and summary["rows_written"] == 5
    assert summary["rows_dropped"] == {"prompt_too_long": 1}
    manifest, data = load_cache(out)
    assert manifest.dropped == {"prompt_too_long": 1} and "too-long" not in data.ids
    assert data.source_row.tolist() == [0, 1, 3, 4, 5]  # input positions, the dropped row skipped

    info = json.loads(invoke(["cache", "info", out, "--json"]).stdout)
    assert (info["rows_read"], info["rows_written"], info["rows_dropped"]) == (6, 5, {"prompt_too_long": 1})


def test_all_rows_dropped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [dict(GOOD, prompt=LONG_PROMPT)])
    out = tmp_path / "cache"
    result = precompute(path, out, "--max-length", 64)
    assert result.exit_code == 2 and "no rows left" in error_line(result)
    assert not out.exists()
