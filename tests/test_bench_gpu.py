"""bench/gpu.sh: the figures' arithmetic, and its CPU smoke mode end to end (dpocli rows)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_bench  # noqa: E402


def test_train_figures_by_hand():
    """Steps end at 10, 12 and 14 s; step 1 is warm-up, so steps 2-3 take 4 s for 2·2 pairs and
    2·100 tokens run (the dataset holds 120 per step: the run shared prompts). With N = 1e6
    parameters, 6·N·50 tokens/s = 3e8 FLOP/s, which is 30% of a 1e-3 TFLOP/s peak."""
    rec = {"step_end_s": [10.0, 12.0, 14.0], "step_tokens": [100, 100, 100], "pairs_per_step": 2,
           "step_cpu_s": None, "steps": [{"loss": 0.7}, {"loss": 0.69}, {"loss": 0.68}]}
    fig = gpu_bench.train_figures(rec, [120, 120, 120], n_params=10**6, flops_factor=6, peak=1e-3)
    assert fig["pairs_per_s"] == pytest.approx(1.0)
    assert fig["tokens_run_per_s"] == pytest.approx(50.0)
    assert fig["tokens_per_s"] == pytest.approx(60.0)
    assert fig["mfu"] == pytest.approx(0.30)
    assert gpu_bench.train_figures(rec, [120] * 3, 10**6, 6, None)["mfu"] is None  # no guessing
    pre = gpu_bench.precompute_figures(2.0, dataset_tokens=400, tokens_run=300, n_params=10**6,
                                       peak=1e-3)
    assert pre["tokens_per_s"] == 200 and pre["mfu"] == pytest.approx(2 * 10**6 * 150 / 1e9)


def test_peak_detection(monkeypatch):
    monkeypatch.delenv("GPU_PEAK_TFLOPS", raising=False)
    assert gpu_bench.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_bench.peak_tflops("NVIDIA A10G") is None
    monkeypatch.setenv("GPU_PEAK_TFLOPS", "312")
    assert gpu_bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0


@pytest.mark.slow
@pytest.mark.bench  # a separate CI step: pytest -m "memory or bench"
def test_smoke_mode_runs_the_dpocli_rows(tmp_path):
    """The whole script (gpu.sh -> gpu_bench.py -> dpo precompute-ref / train in child
    processes) on CPU. TRL rows need the benchmark venv, so they are left to a manual run."""
    proc = subprocess.run(["bash", "bench/gpu.sh", "--smoke", "--rows", "dpocli,dpocli-pkps",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu-smoke.json").read_text())
    plain, packed = res["rows"]["dpocli"], res["rows"]["dpocli-pkps"]
    assert plain["attention_kernel"] == "default" and packed["attention_kernel"] == "packed-sdpa"
    for row in (plain, packed):
        assert row["train"]["steps"] == 4 and row["train"]["pairs_per_s"] > 0
        assert row["step0_max_abs_diff"] <= 0.5  # dpocli's bf16 step-0 tolerance
        assert math.isfinite(row["train"]["final_loss"])
        assert row["train"]["mfu"] is None and row["peak_gpu_mem_mb"]["train"] is None  # CPU
    # Our token count (the data under the model's tokenizer) must be what dpocli ran in the
    # padded layout, and more than it ran with the prompt shared.
    assert plain["train"]["tokens_per_s"] == pytest.approx(plain["train"]["tokens_run_per_s"])
    assert packed["train"]["tokens_run_per_s"] < 0.9 * packed["train"]["tokens_per_s"]
    table = (tmp_path / "gpu-smoke.md").read_text()
    assert gpu_bench.LABELS["dpocli-pkps"] in table and "CPU smoke run" in table
