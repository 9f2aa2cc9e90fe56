"""bf16 on CUDA: the invariants the CPU tests check in fp32, with tolerances argued for bf16, and
the FlexAttention kernel's first run on the device it is meant for. Skipped without CUDA (run them
with `python -m pytest -m gpu tests/test_gpu.py` where a GPU is lent).

bf16 keeps 8 significant bits: a relative rounding of 2^-8 ≈ 0.4% at every stored activation.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import MODEL, invoke, read_jsonl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA_BF16 = ["--device", "cuda", "--dtype", "bfloat16"]


@pytest.fixture(scope="module")
def bf16_cache(tmp_path_factory, small_prefs):
    out = tmp_path_factory.mktemp("gpu") / "bf16"
    result = invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", out, "--batch-size", 8,
                     "--quiet", *CUDA_BF16])
    assert result.exit_code == 0, result.stderr
    return out


def test_step0_check_passes_with_a_bf16_precompute(bf16_cache, tmp_path):
    """Training batches are padded differently from the precompute's, so bf16 sums can differ;
    dpocli's bf16 step-0 tolerance (0.5 on a summed log-prob) must hold, or the run stops."""
    result = invoke(["train", bf16_cache, "--model", MODEL, "--out", tmp_path / "run", "--max-steps",
                     1, "--batch-size", 8, "--json", "--quiet", *CUDA_BF16])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["step0_policy_is_reference"]
    assert summary["step0_max_abs_diff"] <= 0.5
    assert summary["peak_gpu_mem_mb"] > 0


def test_reference_on_its_own_bf16_cache_is_neutral(bf16_cache):
    """`dpo eval` replays the cache's batches, so on one GPU the reference recomputes the same
    bf16 numbers (same shapes, same kernels): margins 0 and loss ln 2. The margin tolerance
    1e-3 = β·1e-2 allows a cuBLAS algorithm change between calls, far below one bf16 ulp of a
    summed log-prob (~0.25 near -60)."""
    result = invoke(["eval", bf16_cache, "--model", MODEL, "--json", "--quiet", *CUDA_BF16])
    assert result.exit_code == 0, result.stderr
    m = json.loads(result.stdout)["models"][0]
    assert abs(m["rewards/margins"]) <= 1e-3
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-3)


@pytest.mark.parametrize("extra", [["--packing"], ["--packing", "--prefix-sharing"]])
def test_packed_bf16_training_follows_the_padded_trajectory(bf16_cache, tmp_path, extra):
    """Tolerance 0.02 on the loss: the two layouts round differently (other kernels, other
    summation order), so a per-token log-prob near -7 differs by up to ~0.03 (0.4%); over ~30
    completion tokens with random signs that is ~0.15 per summed log-prob, β = 0.1 turns it into
    ~0.015 in the DPO logit, and |d loss / d logit| ≤ 1. Three steps at lr 1e-4 move the weights
    too little to amplify it."""
    args = ["--model", MODEL, "--max-steps", 3, "--batch-size", 8, "--lr", "1e-4", "--no-shuffle",
            "--quiet", *CUDA_BF16]
    assert invoke(["train", bf16_cache, "--out", tmp_path / "pad", *args]).exit_code == 0
    assert invoke(["train", bf16_cache, "--out", tmp_path / "pk", *args, *extra]).exit_code == 0
    padded = [r["loss"] for r in read_jsonl(tmp_path / "pad" / "metrics.jsonl") if "loss" in r]
    packed = [r["loss"] for r in read_jsonl(tmp_path / "pk" / "metrics.jsonl") if "loss" in r]
    assert len(packed) == len(padded) == 3
    assert packed == pytest.approx(padded, abs=0.02)


def test_flex_kernel_on_cuda_matches_per_sequence_sdpa(monkeypatch):
    """The check that would let DPOCLI_ATTN_KERNEL=flex become a default on CUDA: compiled
    FlexAttention's forward AND backward against the per-sequence SDPA kernel, fp32 with TF32
    off, packed and prefix-shared, on a GQA model. 1e-4 allows for the two kernels' different
    softmax blocking in fp32."""
    from test_attention import PAIRS
    from transformers import AttentionInterface, AutoModelForCausalLM

    from dpocli.model.attention import ENV
    from dpocli.model.logprobs import CompletionScorer, sequence_logps
    from dpocli.model.packing import collate_packed, enable_packed_attention, packed_attention

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = AutoModelForCausalLM.from_pretrained(MODEL).cuda()
    try:
        for share_prefix in (False, True):
            batch = collate_packed(*PAIRS, share_prefix=share_prefix).to("cuda")
            runs = {}
            for kernel in ("sdpa", "flex"):
                monkeypatch.setenv(ENV, kernel)
                enable_packed_attention(model)
                model.zero_grad()
                out = sequence_logps(CompletionScorer(model), batch)
                (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
                runs[kernel] = (torch.cat([out.chosen_logps, out.rejected_logps]).detach(),
                                {n: p.grad.clone() for n, p in model.named_parameters()})
            (a, ga), (b, gb) = runs["sdpa"], runs["flex"]
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
            for name in ga:
                torch.testing.assert_close(gb[name], ga[name], atol=1e-4, rtol=1e-3)
    finally:
        AttentionInterface.register("dpocli_packed", packed_attention)


def test_qlora_trains_a_4bit_policy_on_cuda(bf16_cache, tmp_path):
    """QLoRA as it is used on a GPU: nf4 with nested quantization computing in bf16, an all-linear
    adapter, gradient checkpointing. The base really is 4-bit on the device (Linear4bit, packed
    uint8), only the adapter trains, the step-0 gap to the unquantized bf16 cache is reported and
    not enforced, the loss falls, and `dpo eval --load-in-4bit` of the adapter reproduces the final
    periodic eval (same quantized weights, same batches up to bf16 kernel choice: 1e-3)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from dpocli.cache import store as cache
    from dpocli.model import quantization
    from dpocli.scoring.policy import build_policy
    from dpocli.train.config import TrainConfig

    quant = ["--load-in-4bit", "--use-bnb-nested-quant"]
    lora = ["--lora-r", 8, "--lora-target-modules", "all-linear"]
    cfg = TrainConfig(cache=str(bf16_cache), model=str(MODEL), out=str(tmp_path / "x"), lora_r=8,
                      lora_target_modules="all-linear", load_in_4bit=True, use_bnb_nested_quant=True,
                      dtype="bfloat16", device="cuda")
    cfg.check()
    model, _ = build_policy(cfg, cache.load_cache(bf16_cache)[1], None, torch.device("cuda"))
    assert quantization.quantized_modules(model) == {"Linear4bit": 14}
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert q_proj.weight.device.type == "cuda" and q_proj.weight.dtype == torch.uint8
    assert q_proj.compute_dtype == torch.bfloat16 and q_proj.weight.quant_state.nested
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    del model

    run = tmp_path / "qlora"
    result = invoke(["train", bf16_cache, "--model", MODEL, "--out", run, "--max-steps", 8, "--batch-size", 8,
                     "--lr", "5e-3", *lora, *quant, "--gradient-checkpointing", "--eval-cache", bf16_cache,
                     "--json", *CUDA_BF16])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert not summary["step0_policy_is_reference"] and summary["peak_gpu_mem_mb"] > 0
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=0.05) and losses[-1] < losses[0] - 0.05
    scored = invoke(["eval", bf16_cache, "--model", run, *quant, "--json", "--quiet", *CUDA_BF16])
    assert scored.exit_code == 0, scored.stderr
    assert json.loads(scored.stdout)["models"][0]["loss"] == pytest.approx(summary["eval"]["eval_loss"], abs=1e-3)
