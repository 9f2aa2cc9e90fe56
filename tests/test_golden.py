"""A fixed 10-step run on the sample data, pinned step by step (golden values).

The fixture was written by `tests/fixtures/make_golden_trajectory.py` before the training loop was
restructured (issue 14), so any change of behaviour in a refactor shows up here. Regenerate it only
for a deliberate change of numbers, and say so in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import MODEL, invoke, read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "golden_trajectory.json"
GOLDEN_ARGS = ["--max-steps", "10", "--batch-size", "8", "--lr", "5e-4", "--warmup-steps", "2",
               "--save-every", "5", "--quiet"]
PINNED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "num_tokens", "epoch")


def golden_run(cache: Path, out: Path) -> list[dict]:
    result = invoke(["train", cache, "--model", MODEL, "--out", out, *GOLDEN_ARGS])
    assert result.exit_code == 0, result.stderr
    return [{k: r[k] for k in PINNED} for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_ten_steps_on_the_sample_equal_the_golden_trajectory(train_cache, tmp_path):
    expected = json.loads(FIXTURE.read_text())
    got = golden_run(train_cache, tmp_path / "run")
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
    for step, (g, e) in enumerate(zip(got, expected, strict=True), start=1):
        for key in PINNED:
            assert g[key] == pytest.approx(e[key], rel=1e-6, abs=1e-7), (step, key)
