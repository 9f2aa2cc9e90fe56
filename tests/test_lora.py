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


@pytest.mark.parametrize("flag,check", [
    ("--use-dora", lambda cfg, weights: cfg["use_dora"] and any("lora_magnitude_vector" in k for k in weights)),
    ("--use-rslora", lambda cfg, weights: cfg["use_rslora"]),
    ("--lora-modules-to-save lm_head", lambda cfg, weights: cfg["modules_to_save"] == ["lm_head"]
     and any("lm_head" in k for k in weights)),
])
def test_peft_options_reach_the_adapter(small_cache, tmp_path, flag, check):
    import json

    from safetensors.torch import load_file
    run = tmp_path / "run"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", run, "--lora-r", 4, *flag.split(),
                     "--max-steps", 1, "--batch-size", 4, "--quiet"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((run / "adapter_config.json").read_text())
    assert check(config, load_file(run / "adapter_model.safetensors"))


def test_rslora_scales_by_alpha_over_sqrt_r():
    from transformers import AutoModelForCausalLM

    from dpocli.model import lora
    for rslora, expected in ((False, 32 / 16), (True, 32 / 16**0.5)):
        model = lora.wrap(AutoModelForCausalLM.from_pretrained(MODEL), r=16, alpha=32, dropout=0.0,
                          target_modules=None, use_rslora=rslora)
        scalings = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
        assert scalings == {expected}


@pytest.mark.parametrize("flag", ["--use-dora", "--use-rslora", "--lora-modules-to-save=lm_head"])
def test_peft_options_without_lora_are_refused(small_cache, tmp_path, flag):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", flag])
    assert result.exit_code == 2 and "--lora-r" in result.stderr and not (tmp_path / "r").exists()
