"""Prefix sharing (prompt run once per pair) gives the same log-probs, gradients, caches and
training as the standard two-row layout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import MODEL, invoke, read_jsonl, ref_values
from dpocli.model.batching import collate, collate_shared
from dpocli.model.logprobs import CompletionScorer, sequence_logps

PAIRS = ([[1, 50, 60, 70, 80], [1, 44, 45], [1, 9, 10, 11, 12, 13, 14]],
         [[90, 91, 92], [7, 8, 2], [20, 2]],
         [[93, 94], [30, 31, 32, 33, 2], [2]])


def test_mask_lets_rejected_see_the_prompt_but_never_the_chosen():
    batch = collate_shared([[1, 5]], [[6, 7]], [[8, 9, 10]], pad_id=0)
    allowed = (batch.attention_mask[0, 0] == 0).int().tolist()
    # rows/cols: p0 p1 c0 c1 r0 r1 r2  (by hand)
    assert allowed == [[1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0, 0],
                       [1, 1, 0, 0, 1, 0, 0],
                       [1, 1, 0, 0, 1, 1, 0],
                       [1, 1, 0, 0, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    # c0 from p1 (index 1), c1 from c0 (2); r0 from p1 (1), r1 from r0 (4), r2 from r1 (5)
    assert batch.score_from.tolist() == [1, 2, 1, 4, 5]
    assert batch.segments.tolist() == [0, 0, 1, 1, 1]


def test_shared_layout_scores_and_gradients_match_the_standard_layout():
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    scorer = CompletionScorer(model, chunk_size=4)
    grads = []
    for make in (collate, collate_shared):
        model.zero_grad()
        out = sequence_logps(scorer, make(*PAIRS, 0), keep_token_logps=True)
        (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
        grads.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = grads
    assert torch.allclose(a.chosen_logps, b.chosen_logps, atol=1e-5)
    assert torch.allclose(a.rejected_logps, b.rejected_logps, atol=1e-5)
    assert a.chosen_len.tolist() == b.chosen_len.tolist() == [3, 3, 2]
    assert a.rejected_len.tolist() == b.rejected_len.tolist() == [2, 5, 1]
    for x, y in zip(a.rejected_token_logps, b.rejected_token_logps):
        assert torch.allclose(x, y, atol=1e-5)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-4, rtol=1e-4), name


def test_shared_precompute_equals_standard_and_eval_replays_it_exactly(small_prefs, small_cache, tmp_path):
    shared = tmp_path / "shared"
    assert invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", shared, "--prefix-sharing",
                   "--rows-per-shard", 16, "--batch-size", 8, "--quiet"]).exit_code == 0
    a, b = ref_values(small_cache), ref_values(shared)
    assert a.keys() == b.keys()
    assert max(abs(a[k][i] - b[k][i]) for k in a for i in (0, 1)) < 1e-5
    m = json.loads(invoke(["eval", shared, "--model", MODEL, "--json", "--quiet"]).stdout)["models"][0]
    assert m["rewards/margins"] == 0.0 and m["rewards/accuracies"] == 0.0 and m["loss"] == math.log(2)


def test_shared_training_follows_the_standard_trajectory(small_cache, tmp_path):
    args = ["--model", MODEL, "--max-steps", 3, "--batch-size", 8, "--lr", "1e-3", "--no-shuffle", "--quiet"]
    assert invoke(["train", small_cache, "--out", tmp_path / "std", *args, "--layout", "padded"]).exit_code == 0
    assert invoke(["train", small_cache, "--out", tmp_path / "shr", *args, "--prefix-sharing"]).exit_code == 0
    std = [r["loss"] for r in read_jsonl(tmp_path / "std" / "metrics.jsonl") if "loss" in r]
    shr = [r["loss"] for r in read_jsonl(tmp_path / "shr" / "metrics.jsonl") if "loss" in r]
    assert shr == pytest.approx(std, abs=1e-4)


def test_prefix_sharing_with_flash_attention_is_refused(small_cache, tmp_path):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--prefix-sharing",
                     "--attn-implementation", "flash_attention_2"])
    assert result.exit_code == 2 and "flash" in result.stderr


def test_dense_shared_mask_follows_the_model_dtype():
    """The fp32 mask of `collate_shared` in an fp64 model once gave wrong gradients."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(MODEL).double()
    scorer = CompletionScorer(model)
    grads = []
    for make in (collate, collate_shared):
        model.zero_grad()
        out = sequence_logps(scorer, make(*PAIRS, 0))
        (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:  # fp32 precision: Llama's RMSNorm computes in fp32 (see test_packing)
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5)
