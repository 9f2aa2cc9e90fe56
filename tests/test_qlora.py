"""QLoRA: the base weights in 4 or 8 bits through bitsandbytes, a LoRA adapter trained on top.

The refusals run everywhere: they happen before bitsandbytes is imported, and a missing package or
a too-old one is simulated. The runs need bitsandbytes with CPU kernels (>= 0.46) and peft, and
are skipped without them (CI installs `.[dev]` only); tests/test_gpu.py trains QLoRA on CUDA, and
tests/test_train.py resumes a 4-bit run bitwise.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import MODEL, invoke, qlora_unavailable, read_jsonl
from dpocli.errors import DpocliError
from dpocli.model import quantization
from dpocli.train.config import TrainConfig

LORA = ["--lora-r", 8, "--lora-target-modules", "all-linear"]
needs_qlora = pytest.mark.skipif(qlora_unavailable() is not None, reason=qlora_unavailable() or "")


def train(cache, out, *extra):
    return invoke(["train", cache, "--model", MODEL, "--out", out, *extra])


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and all(not line.startswith("error:") for line in lines[1:])
    return result.stderr


# ---------------------------------------------------------------- refusals (no bitsandbytes needed)


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_quantization_without_lora_is_refused_before_anything_is_created(small_cache, tmp_path, flag):
    result = train(small_cache, tmp_path / "run", flag)
    assert result.exit_code == 2
    err = one_error_line(result)
    assert flag in err and "--lora-r" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,named", [
    (["--load-in-4bit", "--load-in-8bit"], "--load-in-8bit"),
    (["--load-in-8bit", "--bnb-4bit-quant-type", "fp4"], "--bnb-4bit-quant-type"),
    (["--use-bnb-nested-quant"], "--use-bnb-nested-quant"),
    (["--load-in-4bit", "--bnb-4bit-quant-type", "int4"], "'int4' is not one of nf4, fp4"),
])
def test_contradicting_or_ignored_quantization_flags_are_refused(small_cache, tmp_path, args, named):
    result = train(small_cache, tmp_path / "run", *LORA, *args)
    assert result.exit_code == 2 and named in one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_quantization_with_fsdp_is_refused(small_cache, tmp_path, monkeypatch):
    """Checked on the config: a real --fsdp run needs a torchrun launch."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = TrainConfig(cache=str(small_cache), model=str(MODEL), out=str(tmp_path / "run"), lora_r=8,
                      load_in_4bit=True, fsdp=True)
    with pytest.raises(DpocliError, match="--load-in-4bit.*--fsdp"):
        cfg.check()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_missing_bitsandbytes_is_a_usage_error_naming_the_extra(small_cache, tmp_path, monkeypatch, command):
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real(name, *a))
    args = (["train", small_cache, "--model", MODEL, "--out", tmp_path / "run", *LORA] if command == "train"
            else ["eval", small_cache, "--model", MODEL])
    result = invoke([*args, "--load-in-4bit"])
    assert result.exit_code == 2
    err = one_error_line(result)
    assert "bitsandbytes" in err and "pip install 'dpocli[qlora]'" in err
    assert not (tmp_path / "run").exists()


def test_cpu_run_with_a_bitsandbytes_without_cpu_kernels_is_refused(small_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(quantization, "bitsandbytes_version", lambda: "0.45.5")
    result = train(small_cache, tmp_path / "run", *LORA, "--load-in-8bit", "--device", "cpu")
    assert result.exit_code == 2
    assert "--load-in-8bit' needs a CUDA device with bitsandbytes 0.45.5" in one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_the_options_give_trls_bitsandbytes_config():
    """TRL's get_quantization_config: compute dtype = the model dtype; 8 bits takes no 4-bit option."""
    pytest.importorskip("transformers")
    quant = quantization.from_options(load_in_4bit=True, bnb_4bit_quant_type="fp4", use_bnb_nested_quant=True)
    config = quantization.bnb_config(quant, torch.bfloat16)
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant,
            config.bnb_4bit_compute_dtype) == (True, "fp4", True, torch.bfloat16)
    assert quantization.bnb_config(quantization.from_options(load_in_8bit=True), torch.float32).load_in_8bit
    assert quantization.from_options() is None


# ---------------------------------------------------------------- runs (bitsandbytes with CPU kernels)


@needs_qlora
@pytest.mark.parametrize("options,layer,storage", [
    (dict(load_in_4bit=True), "Linear4bit", torch.uint8),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", use_bnb_nested_quant=True), "Linear4bit", torch.uint8),
    (dict(load_in_8bit=True), "Linear8bitLt", torch.int8),
])
def test_the_policy_is_quantized_and_only_the_adapter_trains(small_cache, tmp_path, options, layer, storage):
    from dpocli.cache import store as cache
    from dpocli.scoring.policy import build_policy

    cfg = TrainConfig(cache=str(small_cache), model=str(MODEL), out=str(tmp_path / "run"), lora_r=8,
                      lora_target_modules="all-linear", **options)
    cfg.check()
    model, _ = build_policy(cfg, cache.load_cache(small_cache)[1], None, torch.device("cpu"))
    # 2 decoder layers x (q, k, v, o, gate, up, down); the LM head and embeddings stay unquantized
    assert quantization.quantized_modules(model) == {layer: 14}
    base = model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert q_proj.weight.dtype == storage
    assert base.lm_head.weight.dtype == torch.float32
    if options.get("load_in_4bit"):
        state = q_proj.weight.quant_state
        assert state.quant_type == options.get("bnb_4bit_quant_type", "nf4")
        assert state.nested == options.get("use_bnb_nested_quant", False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 14 and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@needs_qlora
@pytest.mark.slow
def test_qlora_learns_and_step0_reports_the_quantization_gap(small_cache, tmp_path):
    """The cache holds the unquantized reference, so at step 0 the 4-bit policy differs from it by
    the quantization error: reported (at most the largest per-pair gap `dpo eval --load-in-4bit`
    finds for the base model over the whole cache), never enforced. Periodic eval during training
    and `dpo eval --load-in-4bit` of the saved adapter score the same model."""
    run, per = tmp_path / "run", tmp_path / "base.parquet"
    result = train(small_cache, run, *LORA, "--load-in-4bit", "--lr", "5e-3", "--max-steps", 8,
                   "--batch-size", 8, "--eval-cache", small_cache, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert not summary["step0_policy_is_reference"]
    assert "quantization error (not checked)" in " ".join(result.stderr.split())

    base = invoke(["eval", small_cache, "--model", MODEL, "--load-in-4bit", "--per-example", per, "--quiet"])
    assert base.exit_code == 0, base.stderr
    import pyarrow.parquet as pq
    rows = pq.read_table(per).to_pylist()
    gap = max(max(abs(r["policy_chosen_logps"] - r["ref_chosen_logps"]),
                  abs(r["policy_rejected_logps"] - r["ref_rejected_logps"])) for r in rows)
    assert 0 < summary["step0_max_abs_diff"] <= gap + 1e-4

    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses[0] != math.log(2) and losses[0] == pytest.approx(math.log(2), abs=0.02)
    assert losses[-1] < losses[0] - 0.05
    assert summary["eval"]["eval_loss"] < math.log(2) - 0.05, summary["eval"]["eval_loss"]
    assert (run / "adapter_model.safetensors").exists() and not (run / "model.safetensors").exists()

    scored = invoke(["eval", small_cache, "--model", run, "--load-in-4bit", "--json", "--quiet"])
    assert scored.exit_code == 0, scored.stderr
    assert json.loads(scored.stdout)["models"][0]["loss"] == pytest.approx(summary["eval"]["eval_loss"], abs=1e-5)


@needs_qlora
@pytest.mark.slow
def test_8bit_with_gradient_checkpointing_and_merge(small_cache, tmp_path):
    """Checkpointing recomputes the same 8-bit forward (same losses); --merge writes a plain model:
    the unquantized base with the adapter merged, as peft merges it."""
    common = [*LORA, "--load-in-8bit", "--lr", "5e-3", "--max-steps", 3, "--batch-size", 8, "--quiet"]
    assert train(small_cache, tmp_path / "plain", *common).exit_code == 0
    result = train(small_cache, tmp_path / "ckpt", *common, "--gradient-checkpointing", "--merge")
    assert result.exit_code == 0, result.stderr
    losses = {name: [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
              for name in ("plain", "ckpt")}
    assert losses["ckpt"] == pytest.approx(losses["plain"], abs=1e-6)

    merged = tmp_path / "ckpt" / "merged"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL), tmp_path / "ckpt")
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(merged)(ids).logits,
                              expected(ids).logits, atol=1e-5)


def test_train_config_has_trls_model_config_names():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant"} <= names


def test_a_quantized_lm_head_is_scored_by_the_models_own_forward():
    """The chunked LM head multiplies by `lm_head.weight`; bitsandbytes' Linear4bit/8bitLt subclass
    nn.Linear but hold packed integers there. transformers leaves the head unquantized by default;
    should one be quantized, the scorer must fall back to the model's forward."""
    from transformers import AutoModelForCausalLM

    from dpocli.model.logprobs import _head_is_plain_linear
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    assert _head_is_plain_linear(model)
    packed = torch.zeros_like(model.lm_head.weight, dtype=torch.uint8)
    model.lm_head.weight = torch.nn.Parameter(packed, requires_grad=False)
    assert not _head_is_plain_linear(model)
