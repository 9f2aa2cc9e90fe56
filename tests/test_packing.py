"""Padding-free packing (`--packing`) gives the same log-probs, gradients, caches and training as
the padded layout, with and without prefix sharing, and never leaks attention across sequences."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import MODEL, invoke, read_jsonl, ref_values
from dpocli.model.attention import PACKED_ATTENTION
from dpocli.model.batching import collate
from dpocli.model.logprobs import CompletionScorer, sequence_logps
from dpocli.model.packing import PackedBatch, PackedUnit, collate_packed

PAIRS = ([[1, 50, 60, 70, 80], [1, 44, 45], [1, 9, 10, 11, 12, 13, 14]],
         [[90, 91, 92], [7, 8, 2], [20, 2]],
         [[93, 94], [30, 31, 32, 33, 2], [2]])


def test_layouts_by_hand():
    plain = collate_packed([[1, 5]], [[6, 7]], [[8, 9, 10]])
    # p0 p1 c0 c1 | p0 p1 r0 r1 r2
    assert plain.input_ids.tolist() == [[1, 5, 6, 7, 1, 5, 8, 9, 10]]
    assert plain.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4]]
    assert plain.units == (PackedUnit(0, 4), PackedUnit(4, 5))
    assert plain.score_from.tolist() == [1, 2, 5, 6, 7]
    assert plain.labels.tolist() == [6, 7, 8, 9, 10]
    assert plain.segments.tolist() == [0, 0, 1, 1, 1]

    shared = collate_packed([[1, 5]], [[6, 7]], [[8, 9, 10]], share_prefix=True)
    # p0 p1 c0 c1 r0 r1 r2: rejected positions restart after the prompt
    assert shared.input_ids.tolist() == [[1, 5, 6, 7, 8, 9, 10]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert shared.units == (PackedUnit(0, 4, prefix=2, branch=3),)
    # c0 from p1, c1 from c0; r0 from p1 (the prompt's end), r1 from r0, r2 from r1
    assert shared.score_from.tolist() == [1, 2, 1, 4, 5]
    assert shared.segments.tolist() == [0, 0, 1, 1, 1]


@pytest.fixture(scope="module")
def model64():
    from transformers import AutoModelForCausalLM
    # fp64, so that "equal" can mean equal to ~1e-12 rather than to fp32 noise
    return AutoModelForCausalLM.from_pretrained(MODEL).double()


def _scores_and_grads(model, batch):
    model.zero_grad()
    out = sequence_logps(CompletionScorer(model, chunk_size=4), batch, keep_token_logps=True)
    (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("share_prefix", [False, True])
def test_packed_scores_and_gradients_equal_the_padded_layout(model64, share_prefix):
    assert model64.config.num_key_value_heads < model64.config.num_attention_heads  # GQA covered
    a, ga = _scores_and_grads(model64, collate(*PAIRS, pad_id=0))
    b, gb = _scores_and_grads(model64, collate_packed(*PAIRS, share_prefix=share_prefix))
    assert model64.config._attn_implementation == PACKED_ATTENTION
    torch.testing.assert_close(b.chosen_logps, a.chosen_logps, atol=1e-12, rtol=0)
    torch.testing.assert_close(b.rejected_logps, a.rejected_logps, atol=1e-12, rtol=0)
    assert b.chosen_len.tolist() == a.chosen_len.tolist() == [3, 3, 2]
    assert b.rejected_len.tolist() == a.rejected_len.tolist() == [2, 5, 1]
    for x, y in zip(a.chosen_token_logps + a.rejected_token_logps,
                    b.chosen_token_logps + b.rejected_token_logps):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)  # token values are kept as fp32
    # Llama's RMSNorm computes in fp32 even in an fp64 model, so a shared prompt's gradient (one
    # fp32 sum of the chosen and rejected terms, instead of two rows) agrees to fp32 precision.
    tol = 1e-5 if share_prefix else 1e-10
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=tol, rtol=tol)


def test_a_layout_that_lets_sequences_see_each_other_scores_differently(model64):
    """The control for the test above: the units are what keeps sequences apart."""
    good = collate_packed(*PAIRS)
    leaky = PackedBatch(good.input_ids, good.position_ids, good.score_from, good.labels,
                        good.segments, (PackedUnit(0, good.num_tokens),), good.num_pairs)
    scorer = CompletionScorer(model64)
    with torch.no_grad():
        a, b = sequence_logps(scorer, good), sequence_logps(scorer, leaky)
    assert torch.equal(a.chosen_logps[:1], b.chosen_logps[:1])  # the first sequence sees no other
    assert (a.rejected_logps - b.rejected_logps).abs().min() > 1e-3


def test_a_packed_model_still_scores_padded_batches_and_generates():
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    scorer = CompletionScorer(model)
    prompt = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        before = sequence_logps(scorer, collate(*PAIRS, pad_id=0))
        generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
        sequence_logps(scorer, collate_packed(*PAIRS))  # switches the model to packed attention
        after = sequence_logps(scorer, collate(*PAIRS, pad_id=0))
        assert torch.equal(after.chosen_logps, before.chosen_logps)
        assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), generated)


def test_packed_gradient_checkpointing_equals_the_plain_path(model64):
    plain, g_plain = _scores_and_grads(model64, collate_packed(*PAIRS, share_prefix=True))
    model64.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model64.train()
    try:
        ckpt, g_ckpt = _scores_and_grads(model64, collate_packed(*PAIRS, share_prefix=True))
    finally:
        model64.gradient_checkpointing_disable()
        model64.eval()
    torch.testing.assert_close(ckpt.chosen_logps, plain.chosen_logps, atol=1e-12, rtol=0)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-10, rtol=1e-10)


def test_packed_precompute_equals_padded_and_eval_replays_it_exactly(small_prefs, small_cache, tmp_path):
    packed = tmp_path / "packed"
    assert invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", packed, "--packing",
                   "--prefix-sharing", "--rows-per-shard", 16, "--batch-size", 8,
                   "--quiet"]).exit_code == 0
    manifest = json.loads((packed / "manifest.json").read_text())
    layout = manifest["spec"]["batching"]
    assert layout["packing"] is True and layout["prefix_sharing"] is True
    a, b = ref_values(small_cache), ref_values(packed)
    assert a.keys() == b.keys()
    assert max(abs(a[k][i] - b[k][i]) for k in a for i in (0, 1)) < 1e-5
    m = json.loads(invoke(["eval", packed, "--model", MODEL, "--json", "--quiet"]).stdout)["models"][0]
    assert m["rewards/margins"] == 0.0 and m["rewards/accuracies"] == 0.0 and m["loss"] == math.log(2)


@pytest.mark.parametrize("extra", [["--packing"], ["--packing", "--prefix-sharing"]])
def test_packed_training_follows_the_padded_trajectory(small_cache, tmp_path, extra):
    args = ["--model", MODEL, "--max-steps", 3, "--batch-size", 8, "--lr", "1e-3", "--no-shuffle",
            "--quiet"]
    assert invoke(["train", small_cache, "--out", tmp_path / "pad", *args, "--layout", "padded"]).exit_code == 0
    assert invoke(["train", small_cache, "--out", tmp_path / "pk", *args, *extra]).exit_code == 0
    padded = [r["loss"] for r in read_jsonl(tmp_path / "pad" / "metrics.jsonl") if "loss" in r]
    packed = [r["loss"] for r in read_jsonl(tmp_path / "pk" / "metrics.jsonl") if "loss" in r]
    assert packed == pytest.approx(padded, abs=1e-5)
    # the checkpoint is a plain transformers folder: our attention name is not saved with it
    saved = json.loads((tmp_path / "pk" / "config.json").read_text())
    assert PACKED_ATTENTION not in json.dumps(saved)


def test_packing_with_another_attention_implementation_is_refused(small_cache, tmp_path):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--packing",
                     "--attn-implementation", "eager"])
    assert result.exit_code == 2 and "--packing" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("share_prefix", [False, True])
def test_packed_attention_keeps_a_models_sliding_window(share_prefix):
    """A Mistral with a 4-token window: transformers' own windowed mask on the padded layout is
    the independent reference (sequences here are up to 9 tokens, so the window bites)."""
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                           attn_implementation="sdpa")
    model = MistralForCausalLM(config).double().eval()
    scorer = CompletionScorer(model)
    with torch.no_grad():
        padded = sequence_logps(scorer, collate(*PAIRS, pad_id=0))
        packed = sequence_logps(scorer, collate_packed(*PAIRS, share_prefix=share_prefix))
        model.config.sliding_window = None  # control: without the window the values change
        unwindowed = sequence_logps(scorer, collate(*PAIRS, pad_id=0))
    torch.testing.assert_close(packed.chosen_logps, padded.chosen_logps, atol=1e-10, rtol=0)
    torch.testing.assert_close(packed.rejected_logps, padded.rejected_logps, atol=1e-10, rtol=0)
    assert (unwindowed.chosen_logps - padded.chosen_logps).abs().max() > 1e-4


def test_packed_attention_refuses_attention_it_cannot_reproduce():
    from dpocli.errors import DpocliError
    from dpocli.model.attention import LAYOUT_KWARG, packed_attention
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(DpocliError, match="soft-capping"):
        packed_attention(torch.nn.Module(), q, q, q, None, softcap=50.0,
                         **{LAYOUT_KWARG: (PackedUnit(0, 3),)})
