"""The README's memory table (bench/memory_table.py): its parameter counter agrees with
transformers, and its figures follow from the stated formulas."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import memory_table as mt  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("shape", [mt.LLAMA3_8B, mt.LLAMA3_70B], ids=lambda s: s.name)
def test_parameter_counter_matches_transformers(shape):
    """Counted on a Llama built on the meta device (no memory), an independent counter."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                         intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         tie_word_embeddings=shape.tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert mt.count_params(shape) == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    assert mt.layer_params(shape) == sum(p.numel() for p in layer.parameters())


def test_published_sizes():
    """Llama-3's model cards: 8.03B and 70.6B parameters."""
    assert round(mt.count_params(mt.LLAMA3_8B) / 1e9, 2) == 8.03
    assert round(mt.count_params(mt.LLAMA3_70B) / 1e9, 1) == 70.6


def test_table_arithmetic():
    """Hand arithmetic for 8B on 8 GPUs: bytes per parameter x P / 8, plus the layer terms."""
    p = mt.count_params(mt.LLAMA3_8B)
    row = mt.rows()[0]
    extra = row["train_bf16_gb"] - 8 * p / 8 / 1e9
    assert row["train_fp32_master_gb"] == pytest.approx(16 * p / 8 / 1e9 + extra)
    assert row["checkpoint_fp32_gb"] == pytest.approx(12 * p / 1e9)
    assert row["final_bf16_gb"] == pytest.approx(2 * p / 1e9)
    assert row["precompute_one_gpu_gb"] == pytest.approx(2 * p / 1e9)
    # 70B: fp32 master weights need 16 bytes per parameter, 1.13 TB: more than 8 x 80 GB.
    big = mt.rows()[1]
    assert 16 * mt.count_params(mt.LLAMA3_70B) / 1e9 > 8 * 80
    assert big["gpus_fp32_master"] > 8 and big["gpus_bf16"] > 8
    assert mt.per_gpu(mt.LLAMA3_70B, big["gpus_bf16"])["train_bf16"] <= 0.9 * 80


def test_readme_table_is_the_computed_one():
    """Once README.md carries the table (under "Memory at scale"), it must be this one."""
    text = README.read_text() if README.exists() else ""
    if "## Memory at scale" not in text:
        pytest.skip("README.md has no memory table yet")
    assert mt.render() in text
