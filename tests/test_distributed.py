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


def test_two_rank_precompute_equals_one_rank(small_prefs, small_cache, tmp_path):
    out = tmp_path / "cache2"
    done = torchrun(["precompute-ref", small_prefs, "--model", MODEL, "--out", out,
                     "--rows-per-shard", 16, "--batch-size", 8, "--quiet", "--json"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1  # one JSON result for the job, from rank 0
    one, two = cache_values(small_cache), cache_values(out)
    assert one.keys() == two.keys()
    for key in one:
        assert one[key][:2] == two[key][:2]
        assert one[key][2] == pytest.approx(two[key][2], abs=1e-6)
        assert one[key][3] == pytest.approx(two[key][3], abs=1e-6)
    assert invoke(["cache", "info", out]).exit_code == 0


def test_two_rank_ddp_follows_one_rank_and_resumes(small_cache, tmp_path):
    common = ["--max-steps", 4, "--no-shuffle", "--lr", "1e-3", "--quiet"]
    single = tmp_path / "single"
    assert invoke(["train", small_cache, "--model", MODEL, "--out", single, "--batch-size", 8, *common]).exit_code == 0
    ddp = tmp_path / "ddp"
    done = torchrun(["train", small_cache, "--model", MODEL, "--out", ddp, "--batch-size", 4,
                     "--save-every", 2, *common])
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


def test_fsdp2_matches_ddp_and_saves_a_normal_hf_model(small_cache, tmp_path):
    common = ["--max-steps", 3, "--no-shuffle", "--lr", "1e-3", "--batch-size", 4, "--quiet",
              "--save-every", 2]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert torchrun(["train", small_cache, "--model", MODEL, "--out", ddp, *common]).returncode == 0
    done = torchrun(["train", small_cache, "--model", MODEL, "--out", fsdp, "--fsdp", *common])
    assert done.returncode == 0, done.stderr
    a = [r["loss"] for r in read_jsonl(ddp / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_jsonl(fsdp / "metrics.jsonl") if "loss" in r]
    assert b == pytest.approx(a, abs=1e-5)
    wa, wb = load_file(ddp / "model.safetensors"), load_file(fsdp / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    # Packed, prefix-shared batches go through the sharded layers' hooks unchanged.
    packed = tmp_path / "fsdp-packed"
    done = torchrun(["train", small_cache, "--model", MODEL, "--out", packed, "--fsdp", "--packing",
                     "--prefix-sharing", *common])
    assert done.returncode == 0, done.stderr
    packed_losses = [r["loss"] for r in read_jsonl(packed / "metrics.jsonl") if "loss" in r]
    assert packed_losses == pytest.approx(a, abs=1e-5)
    # The FSDP checkpoint is sharded (DCP, tests/test_sharded.py): resume on 2 ranks.
    import shutil
    shutil.rmtree(fsdp / "checkpoint-3")
    done = torchrun(["train", small_cache, "--model", MODEL, "--out", fsdp, "--fsdp", "--resume", *common])
    assert done.returncode == 0, done.stderr
    c = [r["loss"] for r in read_jsonl(fsdp / "metrics.jsonl") if "loss" in r]
    assert c == pytest.approx(a, abs=1e-5)


def test_fsdp_without_torchrun_is_a_usage_error(small_cache, tmp_path):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--fsdp"])
    assert result.exit_code == 2 and "torchrun" in result.stderr


def test_two_rank_precompute_resumes_missing_shards(small_prefs, small_cache, tmp_path):
    args = ["precompute-ref", small_prefs, "--model", MODEL, "--out", tmp_path / "c",
            "--rows-per-shard", 16, "--batch-size", 8, "--quiet", "--json"]
    assert torchrun(args).returncode == 0
    (tmp_path / "c" / "part-00002.parquet").unlink()  # as if the rank writing it had died
    again = torchrun(args)
    assert again.returncode == 0, again.stderr
    assert '"status": "resumed"' in again.stdout
    assert cache_values(tmp_path / "c").keys() == cache_values(small_cache).keys()
    assert invoke(["cache", "verify", tmp_path / "c"]).exit_code == 0


def test_two_rank_eval_equals_one_rank(small_cache, tmp_path):
    one = invoke(["eval", small_cache, "--model", MODEL, "--max-tokens", 512, "--json", "--quiet"])
    two = torchrun(["eval", small_cache, "--model", MODEL, "--max-tokens", 512, "--json", "--quiet",
                    "--per-example", tmp_path / "per.jsonl"])
    assert two.returncode == 0, two.stderr
    import json
    a, b = json.loads(one.stdout)["models"][0], json.loads(two.stdout)["models"][0]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert len(read_jsonl(tmp_path / "per.jsonl")) == a["pairs"]  # written once, by rank 0
