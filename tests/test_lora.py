"""LoRA through peft: learns from the cache, saves an adapter peft can load, resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MODEL, invoke

peft = pytest.importorskip("peft")

LORA = ["--lora-r", 16, "--lora-alpha", 32, "--lora-target-modules", "all-linear"]


@pytest.mark.slow
def test_lora_learns_and_its_adapter_loads_with_peft(train_cache, tmp_path):
    run = tmp_path / "lora"
    result = invoke(["train", train_cache, "--model", MODEL, "--out", run, *LORA, "--lr", "5e-3",
                     "--max-steps", 40, "--batch-size", 16, "--warmup-steps", 4, "--merge", "--quiet", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["step0_max_abs_diff"] < 1e-4  # B = 0: the policy starts as the base
    scored = invoke(["eval", train_cache, "--model", run, "--model", run / "merged", "--json", "--quiet"])
    adapter, merged = json.loads(scored.stdout)["models"]
    assert adapter["rewards/accuracies"] > 0.9 and adapter["rewards/margins"] > 0
    assert merged["rewards/accuracies"] == pytest.approx(adapter["rewards/accuracies"], abs=0.01)

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    loaded = AutoPeftModelForCausalLM.from_pretrained(run)
    plain = AutoModelForCausalLM.from_pretrained(run / "merged")
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, plain(ids).logits, atol=1e-4)


def test_merge_without_lora_is_refused(small_cache, tmp_path):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--merge"])
    assert result.exit_code == 2 and "--lora-r" in result.stderr
