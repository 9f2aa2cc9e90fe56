"""torchrun with 2 CPU ranks (gloo) behaves as one job and matches a single process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file
from torchrun_runs import copytree, dpo, rmtree, scenario, unlink

from conftest import MODEL, invoke, qlora_unavailable, read_jsonl

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list, nproc: int = 2) -> subprocess.CompletedProcess:
    # faulthandler: a rank that dies in native code (SIGABRT, SIGSEGV) prints its Python stack.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "dpocli",
           *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def cache_values(cache_dir: Path) -> dict:
    rows = {}
    for shard in sorted(cache_dir.glob("part-*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            rows[r["id"]] = (r["chosen_ids"], r["rejected_ids"], r["ref_chosen_logps"], r["ref_rejected_logps"])
    return rows


PRECOMPUTE = ["--rows-per-shard", 16, "--batch-size", 8, "--quiet", "--json"]


@scenario
def two_rank_precompute(folder, small_prefs):
    return [dpo("cache2", "precompute-ref", small_prefs, "--model", MODEL, "--out", folder / "cache2", *PRECOMPUTE)]


@pytest.mark.torchrun("two_rank_precompute")
def test_two_rank_precompute_equals_one_rank(small_cache, torchrun_scenario):
    out = torchrun_scenario.folder / "cache2"
    done = torchrun_scenario["cache2"]
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1  # one JSON result for the job, from rank 0
    one, two = cache_values(small_cache), cache_values(out)
    assert one.keys() == two.keys()
    for key in one:
        assert one[key][:2] == two[key][:2]
        assert one[key][2] == pytest.approx(two[key][2], abs=1e-6)
        assert one[key][3] == pytest.approx(two[key][3], abs=1e-6)
    assert invoke(["cache", "info", out]).exit_code == 0


DDP_COMMON = ["--max-steps", 4, "--no-shuffle", "--lr", "1e-3", "--quiet"]


@scenario
def two_rank_ddp(folder, small_cache):
    return [dpo("ddp", "train", small_cache, "--model", MODEL, "--out", folder / "ddp", "--batch-size", 4,
                "--save-every", 2, *DDP_COMMON)]


@pytest.mark.torchrun("two_rank_ddp")
def test_two_rank_ddp_follows_one_rank_and_resumes(small_cache, tmp_path, torchrun_scenario):
    common = DDP_COMMON
    single = tmp_path / "single"
    assert invoke(["train", small_cache, "--model", MODEL, "--out", single, "--batch-size", 8, *common]).exit_code == 0
    ddp = torchrun_scenario.folder / "ddp"
    done = torchrun_scenario["ddp"]
    assert done.returncode == 0, done.stderr
    a = [r["loss"] for r in read_jsonl(single / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_jsonl(ddp / "metrics.jsonl") if "loss" in r]
    assert len(b) == 4 and b == pytest.approx(a, abs=1e-5)
    wa, wb = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4

    # Resume the 2-rank run from its step-2 checkpoint on ONE rank with the same global batch.
    for step in (4,):
        import shutil
        shutil.rmtree(ddp / f"checkpoint-{step}")
    resumed = invoke(["train", small_cache, "--model", MODEL, "--out", ddp, "--batch-size", 8,
                      "--save-every", 2, "--resume", *common])
    assert resumed.exit_code == 0, resumed.stderr
    c = [r["loss"] for r in read_jsonl(ddp / "metrics.jsonl") if "loss" in r]
    assert c == pytest.approx(a, abs=1e-5)
    wc = load_file(ddp / "model.safetensors")
    assert max(float((wa[k] - wc[k]).abs().max()) for k in wa) < 1e-4


@pytest.mark.skipif(qlora_unavailable() is not None, reason=qlora_unavailable() or "")
def test_two_rank_qlora_follows_one_rank(small_cache, tmp_path):
    """DDP over a 4-bit base: every rank quantizes the same weights the same way, only the adapter
    is synchronised, and 2 ranks x 4 pairs follow 1 rank x 8 pairs."""
    common = ["--max-steps", 3, "--no-shuffle", "--lr", "5e-3", "--lora-r", 8, "--load-in-4bit", "--quiet"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert invoke(["train", small_cache, "--model", MODEL, "--out", single, "--batch-size", 8, *common]).exit_code == 0
    done = torchrun(["train", small_cache, "--model", MODEL, "--out", ddp, "--batch-size", 4, *common])
    assert done.returncode == 0, done.stderr
    a = [r["loss"] for r in read_jsonl(single / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_jsonl(ddp / "metrics.jsonl") if "loss" in r]
    assert len(b) == 3 and b == pytest.approx(a, abs=1e-5)
    wa, wb = load_file(single / "adapter_model.safetensors"), load_file(ddp / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


FSDP_COMMON = ["--max-steps", 3, "--no-shuffle", "--lr", "1e-3", "--batch-size", 4, "--quiet",
               "--save-every", 2]


@scenario
def fsdp2_vs_ddp(folder, small_cache):
    train = ["train", small_cache, "--model", MODEL, "--out"]
    ddp, fsdp = folder / "ddp", folder / "fsdp"
    return [dpo("ddp", *train, ddp, *FSDP_COMMON),
            dpo("fsdp", *train, fsdp, "--fsdp", *FSDP_COMMON),
            copytree(fsdp, folder / "fsdp-first"),  # the folder as the first run left it
            dpo("packed", *train, folder / "fsdp-packed", "--fsdp", "--packing", "--prefix-sharing", *FSDP_COMMON),
            rmtree(fsdp / "checkpoint-3"),
            dpo("resume", *train, fsdp, "--fsdp", "--resume", *FSDP_COMMON)]


@pytest.mark.torchrun("fsdp2_vs_ddp")
def test_fsdp2_matches_ddp_and_saves_a_normal_hf_model(torchrun_scenario):
    runs = torchrun_scenario
    ddp, fsdp = runs.folder / "ddp", runs.folder / "fsdp"
    assert runs["ddp"].returncode == 0, runs["ddp"].stderr
    done = runs["fsdp"]
    assert done.returncode == 0, done.stderr
    a = [r["loss"] for r in read_jsonl(ddp / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_jsonl(runs.folder / "fsdp-first" / "metrics.jsonl") if "loss" in r]
    assert b == pytest.approx(a, abs=1e-5)
    wa, wb = load_file(ddp / "model.safetensors"), load_file(runs.folder / "fsdp-first" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    # Packed, prefix-shared batches go through the sharded layers' hooks unchanged.
    packed = runs.folder / "fsdp-packed"
    done = runs["packed"]
    assert done.returncode == 0, done.stderr
    packed_losses = [r["loss"] for r in read_jsonl(packed / "metrics.jsonl") if "loss" in r]
    assert packed_losses == pytest.approx(a, abs=1e-5)
    # The FSDP checkpoint is sharded (DCP, tests/test_sharded.py): resumed on 2 ranks after its
    # checkpoint-3 was removed.
    done = runs["resume"]
    assert done.returncode == 0, done.stderr
    c = [r["loss"] for r in read_jsonl(fsdp / "metrics.jsonl") if "loss" in r]
    assert c == pytest.approx(a, abs=1e-5)


def test_fsdp_without_torchrun_is_a_usage_error(small_cache, tmp_path):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--fsdp"])
    assert result.exit_code == 2 and "torchrun" in result.stderr


@scenario
def two_rank_precompute_resume(folder, small_prefs):
    args = ["precompute-ref", small_prefs, "--model", MODEL, "--out", folder / "c", *PRECOMPUTE]
    return [dpo("first", *args),
            unlink(folder / "c" / "part-00002.parquet"),  # as if the rank writing it had died
            dpo("again", *args)]


@pytest.mark.torchrun("two_rank_precompute_resume")
def test_two_rank_precompute_resumes_missing_shards(small_cache, torchrun_scenario):
    assert torchrun_scenario["first"].returncode == 0
    again = torchrun_scenario["again"]
    assert again.returncode == 0, again.stderr
    assert '"status": "resumed"' in again.stdout
    out = torchrun_scenario.folder / "c"
    assert cache_values(out).keys() == cache_values(small_cache).keys()
    assert invoke(["cache", "verify", out]).exit_code == 0


EVAL = ["--max-tokens", 512, "--json", "--quiet"]


@scenario
def two_rank_eval(folder, small_cache):
    return [dpo("eval", "eval", small_cache, "--model", MODEL, *EVAL, "--per-example", folder / "per.jsonl")]


@pytest.mark.torchrun("two_rank_eval")
def test_two_rank_eval_equals_one_rank(small_cache, torchrun_scenario):
    one = invoke(["eval", small_cache, "--model", MODEL, *EVAL])
    two = torchrun_scenario["eval"]
    assert two.returncode == 0, two.stderr
    import json
    a, b = json.loads(one.stdout)["models"][0], json.loads(two.stdout)["models"][0]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert len(read_jsonl(torchrun_scenario.folder / "per.jsonl")) == a["pairs"]  # written once, by rank 0
