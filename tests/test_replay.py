"""The reference model scored on its own cache is exactly neutral, whatever the cache's layout.

`dpo eval` replays precompute's batch plan (the same planner over the same stored shards, with
each shard's recorded budget) in the cache's dtype, so every policy log-prob equals the cached one
bit for bit: every margin is 0.0, accuracy 0, and the sigmoid loss is the mean of N copies of
ln 2. Expected values are those constants; nothing here is compared with a tolerance.
Also: arguments that change the stored numbers or their layout are part of the cache's identity
(or recorded per shard), and the checks that refuse a wrong model/cache pairing.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
from torchrun_runs import dpo, scenario

from conftest import MODEL, SAMPLE, invoke, read_jsonl, write_jsonl
from dpocli.cache.store import read_manifest

IDENTICAL = (1, 5, 12, 20)  # rows made chosen == rejected: --drop-identical leaves gaps in source_row


def write_twins(folder):
    """30 sample rows, four of them with chosen identical to rejected."""
    rows = read_jsonl(SAMPLE / "train.jsonl")[:30]
    for i in IDENTICAL:
        rows[i] = {**rows[i], "rejected": rows[i]["chosen"]}
    return write_jsonl(folder / "twins.jsonl", rows)


@pytest.fixture(scope="module")
def twin_prefs(tmp_path_factory):
    return write_twins(tmp_path_factory.mktemp("twins"))


def precompute(data, out, *args):
    return invoke(["precompute-ref", data, "--model", MODEL, "--out", out, "--quiet", "--json", *args])


def eval_reference(cache_dir, tmp_path, *args) -> tuple[dict, list[dict], str]:
    """(summary metrics, per-example rows, stderr) of the reference model on `cache_dir`."""
    per = tmp_path / "per.jsonl"
    result = invoke(["eval", cache_dir, "--model", MODEL, "--per-example", per, "--json", "--quiet", *args])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["models"][0], read_jsonl(per), result.stderr


def assert_exactly_neutral(m: dict, rows: list[dict]) -> None:
    assert [r["margin"] for r in rows] == [0.0] * len(rows)
    assert all(r["policy_chosen_logps"] == r["ref_chosen_logps"] for r in rows)
    assert all(r["policy_rejected_logps"] == r["ref_rejected_logps"] for r in rows)
    assert m["rewards/accuracies"] == 0.0 and m["rewards/margins"] == 0.0
    # The loss is a float64 mean of N copies of ln 2, which for some N is one ulp off ln 2 itself.
    n = len(rows)
    assert m["loss"] == float(torch.full((n,), math.log(2), dtype=torch.float64).mean())


LAYOUTS = {"auto": [], "padded": ["--layout", "padded"], "prefix-sharing": ["--prefix-sharing"], "packing": ["--packing"],
           "packing+prefix-sharing": ["--packing", "--prefix-sharing"]}
BUDGETS = {"batch-size": ["--batch-size", "3"], "max-tokens": ["--max-tokens", "400"]}


@pytest.mark.parametrize("drop,layout,budget", list(itertools.product(
    [False, True], LAYOUTS, BUDGETS)))
def test_reference_on_its_own_cache_is_exactly_neutral(twin_prefs, tmp_path, drop, layout, budget):
    out = tmp_path / "cache"
    args = ["--rows-per-shard", "8", *LAYOUTS[layout], *BUDGETS[budget]] + ["--drop-identical"] * drop
    result = precompute(twin_prefs, out, *args)
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(out)
    assert len(manifest.shards) == 4  # 30 (or 26) rows in shards of 8
    assert manifest.rows_written == 30 - drop * len(IDENTICAL)
    m, rows, _ = eval_reference(out, tmp_path)
    assert_exactly_neutral(m, rows)


def test_resume_with_another_batch_size_replays_each_shard_exactly(twin_prefs, tmp_path):
    out = tmp_path / "cache"
    common = ["--rows-per-shard", "8", "--drop-identical"]
    assert precompute(twin_prefs, out, *common, "--batch-size", "3").exit_code == 0
    (out / "part-00001.parquet").unlink()  # as if the run had died before this shard
    # After an out-of-memory error the hint is to resume with a smaller budget: that must work.
    result = precompute(twin_prefs, out, *common, "--batch-size", "2")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "resumed"
    m, rows, _ = eval_reference(out, tmp_path)
    assert_exactly_neutral(m, rows)
    budgets = {s["index"]: s["budget"]["batch_size"] for s in read_manifest(out).shards}
    assert budgets == {0: 3, 1: 2, 2: 3, 3: 3}


@pytest.mark.parametrize("flag,field", [("--packing", "batching.packing"),
                                        ("--prefix-sharing", "batching.prefix_sharing")])
def test_layout_flag_on_a_finished_cache_is_refused_then_applied_with_overwrite(
        twin_prefs, tmp_path, flag, field):
    out = tmp_path / "cache"
    assert precompute(twin_prefs, out, "--rows-per-shard", "8", "--layout", "padded").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    refused = precompute(twin_prefs, out, "--rows-per-shard", "8", flag)
    assert refused.exit_code == 2 and refused.stdout == ""
    assert f"{field}: cache has False, run expects True" in refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    redone = precompute(twin_prefs, out, "--rows-per-shard", "8", flag, "--overwrite")
    assert redone.exit_code == 0, redone.stderr
    assert json.loads(redone.stdout)["status"] == "complete"
    assert read_manifest(out).spec["batching"][field.split(".")[1]] is True


# --- numerics: eval runs in the cache's dtype and attention implementation by default ---

@pytest.fixture(scope="module")
def bf16_cache(twin_prefs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "cache"
    result = precompute(twin_prefs, out, "--dtype", "bfloat16", "--attn-implementation", "eager",
                        "--rows-per-shard", "8", "--batch-size", "4")
    assert result.exit_code == 0, result.stderr
    return out


def test_eval_takes_dtype_and_attention_from_the_cache(bf16_cache, tmp_path):
    m, rows, stderr = eval_reference(bf16_cache, tmp_path)
    assert_exactly_neutral(m, rows)
    assert "warning" not in stderr


def test_eval_in_other_numerics_warns_that_neutrality_is_not_expected(bf16_cache, tmp_path):
    m, rows, stderr = eval_reference(bf16_cache, tmp_path, "--dtype", "float32")
    assert "--dtype float32 differs from the cache's bfloat16" in stderr and "neutral" in stderr
    assert any(r["margin"] != 0.0 for r in rows)  # what the warning is about
    _, _, stderr = eval_reference(bf16_cache, tmp_path, "--attn-implementation", "sdpa")
    assert "--attn-implementation sdpa differs from the cache's eager" in stderr
    _, _, stderr = eval_reference(bf16_cache, tmp_path, "--dtype", "bfloat16")
    assert "warning" not in stderr  # the cache's own value, given explicitly


# --- wrong pairings ---

def _model_with_another_tokenizer(tmp_path):
    """The sample model with a different chat template: same vocabulary, another tokenizer."""
    other = tmp_path / "other-model"
    shutil.copytree(MODEL, other)
    (other / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
    return other


def test_eval_refuses_a_model_with_another_tokenizer(small_cache, tmp_path):
    other = _model_with_another_tokenizer(tmp_path)
    result = invoke(["eval", small_cache, "--model", MODEL, "--model", other, "--json"])
    assert result.exit_code == 2 and result.stdout == ""
    line = result.stderr.splitlines()[0]
    assert str(other) in line and "tokenizer.fingerprint" in line and "tokenizer differs" in line
    assert "--allow-tokenizer-mismatch" not in result.stderr  # eval has no such flag


def test_replaced_cache_tokenizer_is_refused_by_verify_eval_and_train(small_cache, tmp_path):
    cache_dir = tmp_path / "cache"
    shutil.copytree(small_cache, cache_dir)
    intact = invoke(["cache", "verify", cache_dir, "--json"])
    assert intact.exit_code == 0 and json.loads(intact.stdout)["tokenizer_files_checked"] >= 2
    replaced = cache_dir / "tokenizer" / "tokenizer_config.json"
    config = json.loads(replaced.read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    replaced.write_text(json.dumps(config))
    for args in (["cache", "verify", cache_dir],
                 ["eval", cache_dir, "--model", MODEL],
                 ["train", cache_dir, "--model", MODEL, "--out", tmp_path / "run", "--max-steps", 1]):
        result = invoke(args)
        assert result.exit_code == 2, args
        line = result.stderr.splitlines()[0]
        assert str(replaced) in line and "tokenizer_files" in line and "sha256" in line, line
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


# --- two ranks: each writes its own shards, and eval splits the replayed batches between ranks ---

TWO_RANK = [("padded", "batch-size"), ("packing+prefix-sharing", "max-tokens")]


@scenario
def two_rank_replay(folder):
    twins, steps = write_twins(folder), []
    for layout, budget in TWO_RANK:
        out, per = folder / layout / "cache", folder / layout / "per.jsonl"
        steps += [dpo(f"made:{layout}", "precompute-ref", twins, "--model", MODEL, "--out", out,
                      "--rows-per-shard", "8", "--drop-identical", *LAYOUTS[layout], *BUDGETS[budget], "--quiet"),
                  dpo(f"scored:{layout}", "eval", out, "--model", MODEL, "--per-example", per, "--json", "--quiet")]
    return steps


@pytest.mark.slow
@pytest.mark.torchrun("two_rank_replay")
@pytest.mark.parametrize("layout,budget", TWO_RANK)
def test_two_rank_reference_on_its_own_cache_is_exactly_neutral(torchrun_scenario, layout, budget):
    made, scored = torchrun_scenario[f"made:{layout}"], torchrun_scenario[f"scored:{layout}"]
    assert made.returncode == 0, made.stderr
    assert scored.returncode == 0, scored.stderr
    per = torchrun_scenario.folder / layout / "per.jsonl"
    assert_exactly_neutral(json.loads(scored.stdout)["models"][0], read_jsonl(per))
