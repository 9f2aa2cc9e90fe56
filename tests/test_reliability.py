"""Crashes, kills and hostile inputs never lose work or produce silently wrong numbers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MODEL, SAMPLE, invoke, read_jsonl

# Same thread count as the in-process runs (conftest): CPU reductions are bitwise-stable only
# for a fixed number of threads.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def default_signal_handlers() -> None:
    """In the child: SIGINT and SIGTERM as a terminal would deliver them. A suite started in the
    background of a non-interactive shell inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so the test would measure the parent's shell, not dpocli."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def spawn(args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpocli", *[str(a) for a in args]], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signal_handlers)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def shard_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache_dir.glob("part-*.parquet"))}


def listed_shards(cache_dir: Path) -> int:
    try:
        return len(json.loads((cache_dir / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_sigkill_during_precompute_then_rerun_equals_uninterrupted(tmp_path):
    args = ["--model", MODEL, "--rows-per-shard", 100, "--batch-size", 2, "--quiet"]
    data = SAMPLE / "train.jsonl"
    killed = tmp_path / "killed"
    proc = spawn(["precompute-ref", data, "--out", killed, *args])
    wait_for(lambda: listed_shards(killed) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    assert invoke(["train", killed, "--model", MODEL, "--out", tmp_path / "r"]).exit_code == 2  # refused

    rerun = invoke(["precompute-ref", data, "--out", killed, *args, "--json"])
    assert rerun.exit_code == 0, rerun.stderr
    assert json.loads(rerun.stdout)["status"] == "resumed"
    clean = tmp_path / "clean"
    assert invoke(["precompute-ref", data, "--out", clean, *args]).exit_code == 0
    assert shard_bytes(killed) == shard_bytes(clean)  # byte-identical, so values are too


@pytest.mark.slow
def test_sigkill_during_train_then_resume_equals_uninterrupted(train_cache, tmp_path):
    args = ["--model", MODEL, "--max-steps", 30, "--batch-size", 16, "--lr", "5e-4",
            "--save-every", 5, "--quiet"]
    full = tmp_path / "full"
    assert invoke(["train", train_cache, "--out", full, *args]).exit_code == 0
    part = tmp_path / "part"
    proc = spawn(["train", train_cache, "--out", part, *args])
    wait_for(lambda: (part / "checkpoint-10").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A kill in the middle of writing a checkpoint leaves only a temporary folder: plant one.
    partial = part / "checkpoint-15.dpocli-tmpdir-00c0ffee00c0ffee"  # atomic.py's name: 16 random hex
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"half a file")
    resumed = invoke(["train", train_cache, "--out", part, *args, "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert (part / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    trajectory = lambda run: [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert trajectory(part) == trajectory(full)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_during_train_saves_and_exits_130(train_cache, tmp_path, signum):
    run = tmp_path / "run"
    proc = spawn(["train", train_cache, "--model", MODEL, "--out", run, "--max-steps", 200,
                  "--batch-size", 16, "--lr", "5e-4"])
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(read_jsonl(run / "metrics.jsonl")) >= 3, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "--resume" in err
    saved = [p.name for p in run.glob("checkpoint-*")]
    assert len(saved) == 1 and saved[0] != "checkpoint-0"


def test_same_seed_gives_identical_caches_and_weights(small_prefs, small_cache, tmp_path):
    again = tmp_path / "again"
    assert invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", again,  # small_cache's arguments
                   "--rows-per-shard", 16, "--batch-size", 8, "--layout", "padded", "--quiet"]).exit_code == 0
    assert shard_bytes(again) == shard_bytes(small_cache)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert invoke(["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 3,
                       "--batch-size", 4, "--lr", "1e-3", "--seed", 7, "--quiet"]).exit_code == 0
    assert (runs[0] / "model.safetensors").read_bytes() == (runs[1] / "model.safetensors").read_bytes()


def test_cache_verify_checks_checksums_and_rescored_values(small_cache, tmp_path):
    ok = invoke(["cache", "verify", small_cache, "--rescore", 6, "--json"])
    assert ok.exit_code == 0, ok.stderr
    result = json.loads(ok.stdout)
    # One scoring path: the sampled rows' batches replayed as precompute ran them, bit for bit.
    assert result["rescored_rows"] == 6 and result["rescore_max_abs_diff"] == 0.0
    assert result["rescore_exact"] is True

    other = tmp_path / "other-model"
    shutil.copytree(MODEL, other)
    import torch
    from safetensors.torch import load_file, save_file
    weights = load_file(other / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    wrong = invoke(["cache", "verify", small_cache, "--rescore", 2, "--model", other])
    assert wrong.exit_code == 2 and "weights differ" in wrong.stderr

    copy = tmp_path / "copy"
    shutil.copytree(small_cache, copy)
    shard = sorted(copy.glob("part-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    bad = invoke(["cache", "verify", copy])
    assert bad.exit_code == 2 and shard.name in bad.stderr
    del torch


@pytest.mark.parametrize("layout", [["--packing"], ["--packing", "--prefix-sharing"], ["--prefix-sharing"]])
def test_rescoring_replays_every_layout_exactly(small_prefs, tmp_path, layout):
    cache_dir = tmp_path / "cache"
    made = invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", cache_dir, "--quiet", *layout])
    assert made.exit_code == 0, made.stderr
    result = invoke(["cache", "verify", cache_dir, "--rescore", 12, "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rescore_max_abs_diff"] == 0.0


def test_stale_cache_values_are_caught_by_rescoring(small_prefs, tmp_path):
    from test_train import _rewrite_ref_values
    cache_dir = tmp_path / "cache"
    assert invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", cache_dir, "--quiet"]).exit_code == 0
    _rewrite_ref_values(cache_dir, 0.25)  # consistent checksums, wrong numbers
    assert invoke(["cache", "verify", cache_dir]).exit_code == 0  # integrity alone cannot tell
    result = invoke(["cache", "verify", cache_dir, "--rescore", 4])
    assert result.exit_code == 2 and "ref_chosen_logps" in result.stderr


def _model_folder(tmp_path: Path, name: str, config: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case,expected", [
    ("missing", "no such model folder"),
    ("not_causal", "not a causal language model"),
    ("remote_code", "--trust-remote-code"),
])
def test_bad_model_paths_are_one_line_errors(small_prefs, tmp_path, case, expected):
    if case == "missing":
        model = tmp_path / "does-not-exist"
    elif case == "not_causal":
        model = _model_folder(tmp_path, "t5", {"model_type": "t5", "d_model": 8, "num_layers": 1,
                                               "num_heads": 1, "d_kv": 8, "d_ff": 8, "vocab_size": 16})
        shutil.copy(MODEL / "tokenizer.json", model)
        shutil.copy(MODEL / "tokenizer_config.json", model)
    else:
        model = _model_folder(tmp_path, "custom", {
            "model_type": "my-custom-lm", "auto_map": {"AutoConfig": "conf.MyConfig",
                                                       "AutoModelForCausalLM": "modeling.MyLM"}})
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(MODEL / name, model)
    out = tmp_path / "cache"
    result = invoke(["precompute-ref", small_prefs, "--model", model, "--out", out])
    assert result.exit_code == 2, result.stderr
    assert expected in result.stderr and str(model) in result.stderr
    assert not (out / "manifest.json").exists()


def test_unwritable_output_path_is_refused(small_prefs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", blocker / "cache"])
    assert result.exit_code == 2 and "cannot be written" in result.stderr
    result = invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", blocker])
    assert result.exit_code == 2 and "not a folder" in result.stderr


def test_out_of_memory_is_exit_1_with_what_to_change(small_cache, tmp_path, monkeypatch):
    import torch

    import dpocli.train.loop as train_mod

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train_mod, "sequence_logps", oom)
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--max-steps", 2])
    assert result.exit_code == 1
    assert "out of memory" in result.stderr and "--batch-size" in result.stderr


def test_rerun_of_a_finished_cache_with_a_damaged_shard_recomputes_it(small_prefs, tmp_path):
    args = ["precompute-ref", small_prefs, "--model", MODEL, "--out", tmp_path / "c",
            "--rows-per-shard", 16, "--quiet", "--json"]
    assert invoke(args).exit_code == 0
    clean = shard_bytes(tmp_path / "c")
    (tmp_path / "c" / "part-00001.parquet").unlink()
    rerun = invoke(args)
    assert rerun.exit_code == 0, rerun.stderr
    assert json.loads(rerun.stdout)["status"] == "resumed"
    assert shard_bytes(tmp_path / "c") == clean
