"""Per-rank peak memory under FSDP2 (issue 15): a process holds its shard, not the model.

A random Llama of ~160M parameters (630 MB in fp32, so weights, gradients and Adam state dominate
a process's memory) is trained for two steps with a checkpoint at each, on 1 process and on 2
ranks with --fsdp; the per-rank peak RSS that dpocli reports (the largest over ranks) must be
at most 0.6x the single process's. The same for `precompute-ref --fsdp` (forward only): 0.75x.
On the full-state path (every rank loads the whole model, checkpoints gathered on rank 0) the
train ratio measured 1.05 on this model (see bench/RESULTS.md), so this test can fail.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import MODEL, write_jsonl
from test_distributed import torchrun

pytestmark = pytest.mark.slow

TRAIN_RATIO, PRECOMPUTE_RATIO = 0.6, 0.75


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A random Llama whose weights dominate memory, with the tiny model's tokenizer (so the
    session's small cache fits it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("models") / "llama-160m"
    config = LlamaConfig(vocab_size=1445, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert 150e6 < sum(p.numel() for p in model.parameters()) < 170e6
    model.save_pretrained(folder)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(MODEL / name, folder / name)
    return folder


def peak_mb(stdout: str) -> float:
    return json.loads(stdout)["peak_rss_mb"]


def test_fsdp_train_with_checkpoints_holds_a_shard_per_rank(big_model, small_cache, tmp_path):
    common = ["--model", big_model, "--max-steps", 2, "--save-every", 1, "--no-shuffle", "--json",
              "--quiet", "--lr", "1e-5"]
    two = torchrun(["train", small_cache, "--out", tmp_path / "two", "--batch-size", 1, "--fsdp",
                    *common])
    assert two.returncode == 0, two.stderr
    # The 1-process figure is taken in a fresh process too: the pytest process carries the
    # session's other tests, so its own ru_maxrss is not the run's.
    single = torchrun(["train", small_cache, "--out", tmp_path / "single", "--batch-size", 2, *common],
                      nproc=1)
    assert single.returncode == 0, single.stderr
    ratio = peak_mb(two.stdout) / peak_mb(single.stdout)
    print(f"train: 1 process {peak_mb(single.stdout):.0f} MB, 2 ranks {peak_mb(two.stdout):.0f} MB "
          f"per rank, ratio {ratio:.2f}")
    assert ratio <= TRAIN_RATIO


def test_fsdp_precompute_holds_a_shard_per_rank(big_model, sample_rows, tmp_path):
    prefs = write_jsonl(tmp_path / "p.jsonl", sample_rows[:8])
    common = [prefs, "--model", big_model, "--batch-size", 2, "--rows-per-shard", 4, "--json", "--quiet"]
    single = torchrun(["precompute-ref", *common, "--out", tmp_path / "one"], nproc=1)
    assert single.returncode == 0, single.stderr
    two = torchrun(["precompute-ref", *common, "--out", tmp_path / "two", "--fsdp"])
    assert two.returncode == 0, two.stderr
    ratio = peak_mb(two.stdout) / peak_mb(single.stdout)
    print(f"precompute: 1 process {peak_mb(single.stdout):.0f} MB, 2 ranks {peak_mb(two.stdout):.0f} MB "
          f"per rank, ratio {ratio:.2f}")
    assert ratio <= PRECOMPUTE_RATIO
