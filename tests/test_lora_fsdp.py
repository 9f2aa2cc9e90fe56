"""LoRA with --fsdp (issues 15/16): a 2-rank FSDP2 LoRA run follows the 1-process LoRA run, writes
the same adapter-only checkpoints and final folder, resumes on 2 ranks and on 1, and merges.
CPU/gloo with torchrun."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from torchrun_runs import copytree, dpo, rmtree, scenario

from conftest import MODEL, invoke, read_jsonl

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

LORA = ["--lora-r", 8, "--lora-target-modules", "all-linear"]
COMMON = ["--max-steps", 4, "--no-shuffle", "--lr", "1e-3", "--save-every", 2, "--quiet", *LORA]


def losses(run) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def max_diff(a_path, b_path) -> float:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def fsdp_train(cache, out, nproc: int, *extra) -> list:
    # 8 pairs per step in every run: 8 per rank on 1 process, 4 per rank on 2.
    return ["train", cache, "--model", MODEL, "--out", out, "--batch-size", 8 // nproc, "--fsdp", *COMMON, *extra]


@scenario
def fsdp_lora(folder, small_cache):
    """DDP and FSDP LoRA runs, then two resumes of the FSDP run from checkpoint-2 (on 2 ranks, then
    on 1), each after removing checkpoint-4; "fsdp@first" and "fsdp@2" keep the folder as the
    first run and the 2-rank resume left it."""
    ddp, fsdp = folder / "ddp", folder / "fsdp"
    return [dpo("ddp", "train", small_cache, "--model", MODEL, "--out", ddp, "--batch-size", 4, *COMMON),
            dpo("fsdp", *fsdp_train(small_cache, fsdp, 2, "--merge")),
            copytree(fsdp, folder / "fsdp@first"),
            rmtree(fsdp / "checkpoint-4"),
            dpo("resume@2", *fsdp_train(small_cache, fsdp, 2, "--resume", "--merge")),
            copytree(fsdp, folder / "fsdp@2"),
            rmtree(fsdp / "checkpoint-4"),
            dpo("resume@1", *fsdp_train(small_cache, fsdp, 1, "--resume", "--merge"), ranks=1)]


@pytest.mark.torchrun("fsdp_lora")
def test_fsdp_lora_follows_one_process_resumes_and_merges(small_cache, tmp_path, torchrun_scenario):
    runs = torchrun_scenario
    one, ddp, fsdp = tmp_path / "one", runs.folder / "ddp", runs.folder / "fsdp@first"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", one, "--batch-size", 8, *COMMON,
                     "--merge"])
    assert result.exit_code == 0, result.stderr
    for name in ("ddp", "fsdp"):
        assert runs[name].returncode == 0, runs[name].stderr

    # Same init (seed -> A, B = 0), same trajectory: measured 3e-8 on the losses, 6e-7 on the adapter.
    assert losses(fsdp) == pytest.approx(losses(one), abs=1e-5)
    assert losses(ddp) == pytest.approx(losses(one), abs=1e-5)
    adapter = "adapter_model.safetensors"
    assert max_diff(one / adapter, fsdp / adapter) < 1e-5
    assert max_diff(ddp / adapter, fsdp / adapter) < 1e-5
    assert max_diff(one / "merged" / "model.safetensors", fsdp / "merged" / "model.safetensors") < 1e-5

    # Adapter-only checkpoints, as one process writes them, plus the adapter's optimizer in dcp/.
    ckpt = fsdp / "checkpoint-2"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "dcp" / ".metadata").is_file()
    assert not (ckpt / "config.json").exists() and not (ckpt / "model.safetensors").exists()
    assert max_diff(one / "checkpoint-2" / adapter, ckpt / adapter) < 1e-5
    assert not (fsdp / "config.json").exists() and (fsdp / "adapter_config.json").is_file()
    assert json.loads((fsdp / "adapter_config.json").read_text())["r"] == 8

    # RUN_DIR is the adapter folder: `dpo eval` loads base + adapter, as for the 1-process run.
    scored = invoke(["eval", small_cache, "--model", one, "--model", fsdp, "--json", "--quiet"])
    assert scored.exit_code == 0, scored.stderr
    a, b = json.loads(scored.stdout)["models"]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)

    # Resumed from checkpoint-2 on 2 ranks (bitwise), then on 1 rank with the same global batch.
    final = load_file(fsdp / adapter)
    for nproc, after in ((2, runs.folder / "fsdp@2"), (1, runs.folder / "fsdp")):
        done = runs[f"resume@{nproc}"]
        assert done.returncode == 0, done.stderr
        assert losses(after) == pytest.approx(losses(one), abs=1e-5)
        resumed = load_file(after / adapter)
        diff = max(float((final[k] - resumed[k]).abs().max()) for k in final)
        assert diff == 0.0 if nproc == 2 else diff < 1e-6, (nproc, diff)


@scenario
def fsdp_dora(folder, small_cache):
    return [dpo("fsdp", *fsdp_train(small_cache, folder / "fsdp", 2, *DORA))]


DORA = ["--use-dora", "--lora-modules-to-save", "lm_head", "--max-steps", 2]


@pytest.mark.torchrun("fsdp_dora")
def test_fsdp_lora_with_dora_and_modules_to_save(small_cache, tmp_path, torchrun_scenario):
    """peft's DoRA magnitudes and fully trained modules (lm_head) shard like the adapter."""
    extra = DORA
    one, fsdp = tmp_path / "one", torchrun_scenario.folder / "fsdp"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", one, "--batch-size", 8, *COMMON, *extra])
    assert result.exit_code == 0, result.stderr
    done = torchrun_scenario["fsdp"]
    assert done.returncode == 0, done.stderr
    assert losses(fsdp) == pytest.approx(losses(one), abs=1e-5)
    weights = load_file(fsdp / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights) and any("lm_head" in k for k in weights)
    assert max_diff(one / "adapter_model.safetensors", fsdp / "adapter_model.safetensors") < 1e-5
