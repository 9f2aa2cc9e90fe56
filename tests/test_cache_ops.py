"""`dpo cache audit|filter|split|merge` (issue 26): the cache as a dataset.

The crafted cache holds 28 sample pairs plus an exact duplicate, a swapped (conflicting) pair and
a pair with chosen == rejected, made with --max-length 48 so that some completions reach it, in
shards of 8 scored 3 pairs per forward. Expected values are recomputed here from the Parquet rows
with plain Python (no dpocli code), except the asinh-binned margin percentiles, checked to 0.1%.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import MODEL, invoke, read_jsonl, write_jsonl
from dpocli.cache import store as cache
from dpocli.cache.manifest import read_manifest

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, sample_rows):
    rows = [dict(r) for r in sample_rows[:28]]
    rows.append({**rows[0], "id": "dup-0"})
    rows.append({**rows[3], "id": "swap-3", "chosen": rows[3]["rejected"], "rejected": rows[3]["chosen"]})
    rows.append({**rows[4], "id": "same-4", "rejected": rows[4]["chosen"]})
    data = write_jsonl(tmp_path_factory.mktemp("crafted") / "prefs.jsonl", rows)
    out = tmp_path_factory.mktemp("caches") / "crafted"
    result = invoke(["precompute-ref", data, "--model", MODEL, "--out", out, "--max-length", MAX_LENGTH,
                     "--rows-per-shard", 8, "--batch-size", 3, "--quiet"])
    assert result.exit_code == 0, result.stderr
    return out


def rows_of(cache_dir) -> list[dict]:
    """Every row in stored order (shards by index), as plain Python."""
    manifest = read_manifest(cache_dir)
    out = []
    for entry in sorted(manifest.shards, key=lambda e: e["index"]):
        out += pq.read_table(cache_dir / entry["file"]).to_pylist()
    return out


def dpo(*args):
    return invoke(["cache", *map(str, args)])


def run_json(*args) -> dict:
    result = dpo(*args, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def margin(r):
    return r["ref_chosen_logps"] - r["ref_rejected_logps"]


def key(r):
    return (tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]))


def truncated(r):
    return max(r["chosen_len"], r["rejected_len"]) + len(r["prompt_ids"]) >= MAX_LENGTH


# ---- audit ----

def test_audit_matches_a_plain_python_count(crafted):
    rows = rows_of(crafted)
    a = run_json("audit", crafted, "--top", 3)
    assert a["rows"] == len(rows) and {"dup-0", "swap-3", "same-4"} <= {r["id"] for r in rows}
    for part, values in (("prompt", [len(r["prompt_ids"]) for r in rows]),
                         ("chosen", [r["chosen_len"] for r in rows]),
                         ("total", [len(r["prompt_ids"]) + max(r["chosen_len"], r["rejected_len"]) for r in rows])):
        got = a["lengths"][part]
        assert got["max"] == max(values) and got["mean"] == round(sum(values) / len(values), 3)
        for q in (50, 95, 99):
            assert got[f"p{q}"] == pytest.approx(float(np.percentile(values, q)), abs=1e-9)
    assert a["at_max_length"]["either"] == sum(truncated(r) for r in rows) > 0
    assert a["identical"] == sum(r["chosen_ids"] == r["rejected_ids"] for r in rows) >= 1
    keys = [key(r) for r in rows]
    assert a["duplicates"] == len(keys) - len(set(keys)) >= 1
    swapped = {(p, r, c) for p, c, r in keys if c != r}
    assert a["conflicting"] == sum(k in swapped for k in keys) >= 2  # row 3 and its swap
    margins = [margin(r) for r in rows]
    ref = a["reference"]
    assert ref["accuracy"] == sum(m > 0 for m in margins) / len(margins)
    assert ref["margin"]["mean"] == pytest.approx(sum(margins) / len(margins), rel=1e-12)
    assert ref["margin"]["min"] == min(margins) and ref["margin"]["max"] == max(margins)
    assert ref["margin"]["p50"] == pytest.approx(float(np.percentile(margins, 50)), rel=2e-3, abs=2e-3)
    strongest = sorted((m, r["id"]) for m, r in zip(margins, rows) if m < 0)[:3]
    assert [(x["margin"], x["id"]) for x in ref["most_reversed"]] == strongest
    diffs = [r["chosen_len"] - r["rejected_len"] for r in rows]
    assert ref["length_bias"]["correlation"] == pytest.approx(float(np.corrcoef(diffs, margins)[0, 1]), rel=1e-9)


def test_audit_draws_a_picture_and_refuses_a_foreign_file(crafted, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "audit.html"
    assert run_json("audit", crafted, "--out", out)["picture"] == str(out)
    assert "dpocli cache audit" in out.read_text()[:400]
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"not ours")
    result = dpo("audit", crafted, "--out", foreign)
    assert result.exit_code == 2 and "was not written by `dpo cache audit`" in result.stderr
    assert foreign.read_bytes() == b"not ours"


# ---- filter ----

FILTERS = {  # option -> which parent rows it keeps (from plain Python)
    "--drop-identical": lambda r, rows: r["chosen_ids"] != r["rejected_ids"],
    "--drop-truncated": lambda r, rows: not truncated(r),
    "--dedupe": lambda r, rows: key(r) not in {key(x) for x in rows[:rows.index(r)]},
    "--drop-conflicting": lambda r, rows: (key(r)[0], key(r)[2], key(r)[1]) not in {key(x) for x in rows}
    or r["chosen_ids"] == r["rejected_ids"],
}


@pytest.mark.parametrize("flag", list(FILTERS))
def test_filter_keeps_exactly_the_rows_that_pass_in_parent_order(crafted, tmp_path, flag):
    rows = rows_of(crafted)
    expected = [r["id"] for r in rows if FILTERS[flag](r, rows)]
    assert len(expected) < len(rows)
    summary = run_json("filter", crafted, "--out", tmp_path / "f", flag)
    assert [r["id"] for r in rows_of(tmp_path / "f")] == expected
    assert summary["rows_written"] == len(expected)
    assert sum(summary["rows_dropped"].values()) == len(rows) - len(expected)


def test_filter_by_margin_tokens_and_ids(crafted, tmp_path):
    rows = rows_of(crafted)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(r["id"] for r in rows[::2]) + "\n\n")
    exclude = tmp_path / "exclude.txt"
    exclude.write_text(rows[4]["id"] + "\n")
    run_json("filter", crafted, "--out", tmp_path / "f", "--min-ref-margin", -1.0, "--max-ref-margin", 2.0,
             "--max-total-tokens", 40, "--ids", ids, "--exclude-ids", exclude)
    expected = [r["id"] for r in rows[::2] if -1.0 <= margin(r) <= 2.0 and r["id"] != rows[4]["id"]
                and len(r["prompt_ids"]) + max(r["chosen_len"], r["rejected_len"]) <= 40]
    assert [r["id"] for r in rows_of(tmp_path / "f")] == expected
    per_token = lambda r: r["ref_chosen_logps"] / r["chosen_len"] - r["ref_rejected_logps"] / r["rejected_len"]  # noqa: E731
    run_json("filter", crafted, "--out", tmp_path / "p", "--min-ref-margin", 0.0, "--per-token")
    assert [r["id"] for r in rows_of(tmp_path / "p")] == [r["id"] for r in rows if per_token(r) >= 0]


def test_filter_sample_is_seeded_and_deterministic_to_the_byte(crafted, tmp_path):
    a = run_json("filter", crafted, "--out", tmp_path / "a", "--sample", 10, "--seed", 7)
    run_json("filter", crafted, "--out", tmp_path / "b", "--sample", 10, "--seed", 7)
    run_json("filter", crafted, "--out", tmp_path / "c", "--sample", 10, "--seed", 8)
    assert a["rows_written"] == 10 and a["rows_dropped"] == {"filter_not_sampled": len(rows_of(crafted)) - 10}
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file())
    assert any(n.startswith("replay-") for n in files)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    ids = lambda d: [r["id"] for r in rows_of(d)]  # noqa: E731
    parent = ids(crafted)
    assert ids(tmp_path / "a") != ids(tmp_path / "c")
    assert ids(tmp_path / "a") == [i for i in parent if i in set(ids(tmp_path / "a"))]  # parent order


def test_derived_manifest_records_lineage_and_is_a_first_class_cache(crafted, tmp_path):
    out = tmp_path / "f"
    run_json("filter", crafted, "--out", out, "--dedupe", "--drop-truncated")
    parent, child = read_manifest(crafted), read_manifest(out)  # read_manifest checks the checksum
    assert child.spec_fingerprint != parent.spec_fingerprint
    derived = child.spec["derived"]
    assert derived["operation"] == "filter" and derived["filter"] == {"dedupe": True, "drop_truncated": True}
    assert derived["parents"][0]["spec_fingerprint"] == parent.spec_fingerprint
    assert derived["parents"][0]["manifest_sha256"] == json.loads((crafted / "manifest.json").read_text())[
        "manifest_sha256"]
    assert child.rows_read == parent.rows_read == child.rows_written + sum(child.dropped.values())
    assert child.dropped["filter_duplicate"] >= 1
    assert run_json("verify", out)["rows"] == child.rows_written
    info = run_json("info", out)
    assert info["rows_dropped"] == child.dropped and info["spec_fingerprint"] == child.spec_fingerprint
    m1, d1 = cache.load_cache(crafted)
    m2, d2 = cache.load_cache(out)
    assert cache.identity(m1, d1)["spec_fingerprint"] != cache.identity(m2, d2)["spec_fingerprint"]


# ---- split and merge ----

def test_split_is_disjoint_stable_by_id_and_complete(crafted, tmp_path):
    s = run_json("split", crafted, "--out-train", tmp_path / "tr", "--out-test", tmp_path / "te",
                 "--test-size", 0.3, "--seed", 1)
    train, test = [r["id"] for r in rows_of(tmp_path / "tr")], [r["id"] for r in rows_of(tmp_path / "te")]
    parent = [r["id"] for r in rows_of(crafted)]
    assert not set(train) & set(test) and sorted(train + test) == sorted(parent)
    assert train == [i for i in parent if i in set(train)] and 0 < len(test) < len(parent)
    assert s["test"]["rows_written"] == len(test)
    # The same ids land on the same side when splitting a subset of the cache.
    run_json("filter", crafted, "--out", tmp_path / "sub", "--drop-truncated")
    run_json("split", tmp_path / "sub", "--out-train", tmp_path / "tr2", "--out-test", tmp_path / "te2",
             "--test-size", 0.3, "--seed", 1)
    assert {r["id"] for r in rows_of(tmp_path / "te2")} <= set(test)


def test_merge_keeps_each_id_once_and_orders_by_cache(crafted, tmp_path):
    run_json("split", crafted, "--out-train", tmp_path / "tr", "--out-test", tmp_path / "te", "--test-size", 0.3)
    run_json("filter", crafted, "--out", tmp_path / "few", "--sample", 5)
    m = run_json("merge", tmp_path / "te", tmp_path / "tr", tmp_path / "few", "--out", tmp_path / "all")
    merged = rows_of(tmp_path / "all")
    test_ids = [r["id"] for r in rows_of(tmp_path / "te")]
    train_ids = [r["id"] for r in rows_of(tmp_path / "tr")]
    assert [r["id"] for r in merged] == test_ids + train_ids
    assert m["duplicates"] == {"duplicate_ids": 5, "same_pair": 5, "different_pair": 0,
                               "kept": "first occurrence, in the order the caches were given"}
    source = [r["source_row"] for r in merged]
    assert source == sorted(source) and len(set(source)) == len(source)
    _, data = cache.load_cache(tmp_path / "all")  # train's loader: row order is source_row order
    assert data.ids == test_ids + train_ids


def test_merge_refuses_caches_made_differently_naming_the_field(crafted, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(crafted, other)
    manifest = read_manifest(other)
    manifest.spec["max_length"] = 64  # as if made with another --max-length (manifest re-signed)
    cache.commit_manifest(other, manifest)
    result = dpo("merge", crafted, other, "--out", tmp_path / "m")
    assert result.exit_code == 2 and result.stdout == ""
    assert "field 'max_length'" in result.stderr and "max_length: cache has 64, first has 48" in result.stderr
    assert not (tmp_path / "m").exists()


# ---- safety and bad values ----

def test_outputs_never_replace_inputs_or_foreign_folders(crafted, tmp_path):
    before = {p.name: p.read_bytes() for p in crafted.iterdir() if p.is_file()}
    assert dpo("filter", crafted, "--out", crafted, "--dedupe", "--overwrite").exit_code == 2
    assert dpo("filter", crafted, "--out", crafted / "sub", "--dedupe").exit_code == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = dpo("filter", crafted, "--out", foreign, "--dedupe", "--overwrite")
    assert result.exit_code == 2 and "not a dpocli cache" in result.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "f"
    run_json("filter", crafted, "--out", out, "--dedupe")
    again = dpo("filter", crafted, "--out", out, "--drop-truncated")
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert run_json("filter", crafted, "--out", out, "--drop-truncated", "--overwrite")["rows_dropped"] == {
        "filter_truncated": sum(truncated(r) for r in rows_of(crafted))}
    (out / "extra.txt").write_text("x")
    refused = dpo("filter", crafted, "--out", out, "--dedupe", "--overwrite")
    assert refused.exit_code == 2 and "'extra.txt'" in refused.stderr and (out / "extra.txt").exists()
    assert {p.name: p.read_bytes() for p in crafted.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("args, message", [
    (["filter", "CACHE", "--out", "OUT"], "no filter given"),
    (["filter", "CACHE", "--out", "OUT", "--sample", "0"], "field '--sample' must be at least 1"),
    (["filter", "CACHE", "--out", "OUT", "--min-ref-margin", "2", "--max-ref-margin", "1"], "--min-ref-margin"),
    (["filter", "CACHE", "--out", "OUT", "--per-token"], "needs --min-ref-margin"),
    (["filter", "CACHE", "--out", "OUT", "--ids", "MISSING"], "no such file"),
    (["filter", "CACHE", "--out", "OUT", "--min-ref-margin", "nan"], "finite"),
    (["split", "CACHE", "--out-train", "OUT", "--out-test", "OUT2", "--test-size", "1.5"], "between 0 and 1"),
    (["split", "CACHE", "--out-train", "OUT", "--out-test", "OUT"], "lies inside --out-test"),
    (["split", "CACHE", "--out-train", "OUT", "--out-test", "OUT/te"], "lies inside --out-test"),
    (["merge", "CACHE", "--out", "OUT"], "at least two caches"),
    (["audit", "CACHE", "--top", "-1"], "field '--top' must be at least 0"),
    (["audit", "CACHE", "--out", "OUT.txt"], "unknown picture format"),
    (["audit", "MISSING"], "no such cache folder"),
])
def test_bad_values_are_one_error_line_and_exit_2(crafted, tmp_path, args, message):
    paths = {"CACHE": crafted, "OUT": tmp_path / "out", "OUT2": tmp_path / "out2", "MISSING": tmp_path / "nope",
             "OUT.txt": tmp_path / "a.txt", "OUT/te": tmp_path / "out" / "te"}
    result = dpo(*[paths.get(a, a) for a in args])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and message in lines[0] and len(lines) <= 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


# ---- train and eval on derived caches ----

def test_reference_on_derived_caches_is_exactly_neutral(crafted, tmp_path, monkeypatch):
    """Kept rows sit in forwards with dropped ones; eval reruns those forwards (replay rows).
    Without them (eval planning the kept rows afresh, as `--max-tokens` does) the sample's filtered
    cache gave 24 of 60 margins != 0 when this was written. The merged cache is read through the
    memory-mapped path of torchrun (DPOCLI_CACHE_MMAP=1), which must attach the replay rows too."""
    run_json("filter", crafted, "--out", tmp_path / "f", "--sample", 12, "--seed", 3)
    run_json("split", tmp_path / "f", "--out-train", tmp_path / "tr", "--out-test", tmp_path / "te",
             "--test-size", 0.4)
    run_json("merge", tmp_path / "te", tmp_path / "tr", "--out", tmp_path / "m")
    assert sum(e["replay"]["rows"] for e in read_manifest(tmp_path / "te").shards) > 0
    for name in ("te", "m"):
        if name == "m":
            monkeypatch.setenv("DPOCLI_CACHE_MMAP", "1")
        per = tmp_path / f"{name}.jsonl"
        result = invoke(["eval", tmp_path / name, "--model", MODEL, "--per-example", per, "--json", "--quiet",
                         "--samples", 1, "--ref-model", MODEL, "--kl-samples", 1, "--max-new-tokens", 4])
        assert result.exit_code == 0, result.stderr
        m, rows = json.loads(result.stdout)["models"][0], read_jsonl(per)
        assert [r["margin"] for r in rows] == [0.0] * len(rows) and len(rows) == rows_of(tmp_path / name).__len__()
        assert all(r["policy_chosen_logps"] == r["ref_chosen_logps"] for r in rows)
        assert all(r["policy_rejected_logps"] == r["ref_rejected_logps"] for r in rows)
        assert m["rewards/accuracies"] == 0.0 and m["rewards/margins"] == 0.0
        assert m["loss"] == pytest.approx(math.log(2), abs=1e-15)
        assert m["samples"]["kl_policy_ref"]["estimate"] == 0.0


def test_train_runs_on_a_derived_cache_and_resume_refuses_another(crafted, tmp_path):
    out, run = tmp_path / "f", tmp_path / "run"
    run_json("filter", crafted, "--out", out, "--drop-truncated")
    train = ["train", out, "--model", MODEL, "--out", run, "--batch-size", 4, "--save-every", 1, "--quiet",
             "--max-steps", 1]
    result = invoke(train)
    assert result.exit_code == 0, result.stderr
    run_json("filter", crafted, "--out", out, "--dedupe", "--overwrite")  # another cache, same folder
    resumed = invoke([*train, "--resume"])
    assert resumed.exit_code == 2 and "rebuilt" in resumed.stderr


@pytest.mark.parametrize("budget", [{"batch_size": 3, "max_tokens": None}, {"batch_size": None, "max_tokens": 400},
                                    {"batch_size": None, "max_tokens": 10}])
def test_vectorised_plan_equals_precomputes_planner(budget):
    from dpocli.cache.derive import plan_members
    from dpocli.data.batch_plan import Batching, plan_reference_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=(500, 3))
    lengths[::7] = lengths[0]  # ties: broken by position in both
    batching = Batching(**budget, rows_per_shard=500, packing=False, prefix_sharing=False)
    batch, member = plan_members(lengths, batching)
    mine = [member[batch == b].tolist() for b in range(int(batch.max()) + 1)]
    assert mine == plan_reference_batches([tuple(map(int, r)) for r in lengths], batching)


def test_precompute_overwrite_replaces_a_derived_cache(crafted, tmp_path, sample_rows):
    out = tmp_path / "f"
    run_json("filter", crafted, "--out", out, "--sample", 5)
    assert any(p.name.startswith("replay-") for p in out.iterdir())
    data = write_jsonl(tmp_path / "p.jsonl", sample_rows[:4])
    args = ["precompute-ref", data, "--model", MODEL, "--out", out, "--quiet"]
    refused = invoke(args)
    assert refused.exit_code == 2 and "made differently" in refused.stderr
    assert invoke([*args, "--overwrite"]).exit_code == 0
    assert not any(p.name.startswith("replay-") for p in out.iterdir())
    assert read_manifest(out).rows_written == 4
