"""Shared fixtures: the bundled tiny model, small preference files, and caches built once per session."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one thread avoids oversubscription and is faster on 2 shared cores.
torch.set_num_threads(1)
from torchrun_runs import torchrun_runs, torchrun_scenario  # noqa: E402, F401 (session fixtures)
from typer.testing import CliRunner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
MODEL = SAMPLE / "tiny-llama"


SEPARATE_STEPS = ("memory", "bench")  # CI runs them after the suite: pytest -m "memory or bench"


def pytest_collection_modifyitems(config, items):
    """Tests marked `memory` or `bench` run only when -m names their marker (pyproject.toml)."""
    named = config.getoption("markexpr") or ""
    left = [i for i in items if any(i.get_closest_marker(m) and m not in named for m in SEPARATE_STEPS)]
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = [i for i in items if i not in left]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return MODEL


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ref_values(cache_dir: Path) -> dict:
    """id -> (ref_chosen_logps, ref_rejected_logps) over every shard of a cache."""
    import pyarrow.parquet as pq
    rows = {}
    for shard in cache_dir.glob("part-*.parquet"):
        for r in pq.read_table(shard).to_pylist():
            rows[r["id"]] = (r["ref_chosen_logps"], r["ref_rejected_logps"])
    return rows


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    return read_jsonl(SAMPLE / "train.jsonl")


@pytest.fixture(scope="session")
def small_prefs(tmp_path_factory, sample_rows) -> Path:
    """48 sample rows, standard and conversational mixed, as a JSONL file."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "small.jsonl", sample_rows[:48])


def invoke(args: list[str]):
    """Run the `dpo` CLI in-process; returns click's Result (stdout and stderr kept apart)."""
    from dpocli.cli.app import app
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, small_prefs) -> Path:
    out = tmp_path_factory.mktemp("caches") / "small"
    result = invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", out,
                     "--rows-per-shard", 16, "--batch-size", 8, "--layout", "padded", "--quiet"])
    assert result.exit_code == 0, result.stderr
    return out


def _sample_cache(tmp_path_factory, split: str) -> Path:
    out = tmp_path_factory.mktemp("caches") / split
    result = invoke(["precompute-ref", SAMPLE / f"{split}.jsonl", "--model", MODEL, "--out", out, "--quiet"])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory) -> Path:
    return _sample_cache(tmp_path_factory, "train")


@pytest.fixture(scope="session")
def heldout_cache(tmp_path_factory) -> Path:
    return _sample_cache(tmp_path_factory, "heldout")


# Hyper-parameters of the sample run (README and tests use the same ones).
SAMPLE_TRAIN_ARGS = ["--lr", "5e-4", "--epochs", "1", "--batch-size", "16", "--warmup-steps", "5"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, train_cache) -> Path:
    """One epoch of DPO on the sample training cache (about 75 steps)."""
    out = tmp_path_factory.mktemp("runs") / "sample"
    result = invoke(["train", train_cache, "--model", MODEL, "--out", out, "--quiet", *SAMPLE_TRAIN_ARGS])
    assert result.exit_code == 0, result.stderr
    return out


def qlora_unavailable() -> str | None:
    """Why a quantized (QLoRA) run cannot happen on this machine's CPU, or None when it can:
    bitsandbytes has CPU kernels from 0.46, and the adapter needs peft. CI installs `.[dev]`,
    without bitsandbytes, so there these runs are skipped (the refusals are tested everywhere)."""
    import importlib.util
    if importlib.util.find_spec("peft") is None:
        return "needs peft"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes (pip install 'dpocli[qlora]')"
    from dpocli.model import quantization
    version = quantization.bitsandbytes_version()
    if quantization._release(version) < quantization.CPU_SINCE:
        return f"bitsandbytes {version} has no CPU kernels"
    return None


# ---------------------------------------------------------------- pinned values: signal, not noise

# Metrics that are discontinuous in values at rounding level: the strict-> accuracy flips when a
# margin of ~0 changes sign. Compared only at steps where every margin is clear of the tie.
TIE_SENSITIVE = ("rewards/accuracies",)


@contextlib.contextmanager
def smallest_margin_per_step():
    """Record, for every optimizer step of an in-process run, the smallest |margin| of its pairs (a
    new `StepMetrics` starts each step; every micro-batch's rewards pass through `add`)."""
    from dpocli.objective.metrics import StepMetrics
    steps: list[float] = []
    init, add = StepMetrics.__init__, StepMetrics.add

    def recording_init(self):
        init(self)
        steps.append(float("inf"))

    def recording_add(self, out, policy_chosen, policy_rejected):
        margin = (out.chosen_rewards.double() - out.rejected_rewards.double()).abs()
        steps[-1] = min(steps[-1], float(margin.min()))
        add(self, out, policy_chosen, policy_rejected)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StepMetrics, "__init__", recording_init)
        patch.setattr(StepMetrics, "add", recording_add)
        yield steps


def compared_keys(keys, smallest_margin: float, tie: float) -> list[str]:
    """The keys to compare at one step: a tie-sensitive metric only where no pair's margin lies
    within `tie` of 0 (there its sign is rounding noise and the other side may see it flip)."""
    return [k for k in keys if k not in TIE_SENSITIVE or smallest_margin > tie]


def runtime_peak_mb(*modules: str) -> float:
    """Peak RSS (MB) of a fresh interpreter that has imported torch, transformers, pyarrow and
    `modules`, and loaded no model: the part of a rank's peak that no sharding can remove.
    VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (this pytest
    process) into the exec'd child, VmHWM starts afresh with the new program."""
    import subprocess
    import sys
    code = (f"import torch, transformers, pyarrow, {', '.join(modules)}; "
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return float(done.stdout.split()[-1]) / 1024
