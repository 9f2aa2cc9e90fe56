"""Tests for dpocli.model.logprobs against a second, naive implementation (minGPT-vs-HF style).

The naive reference scores one sequence at a time with no padding: `model(ids).logits` (fp32),
`log_softmax`, gather the next token, sum over the completion tokens. The log_softmax of the naive
path runs in float64: an fp32 log_softmax is itself off by up to ~3e-6 per token on these logits
(|logit| ~ 20), which sums to ~2e-5 over a 22-token completion, more than the 1e-5 budget, while
dpocli's gather - logsumexp is within ~4e-6 of the exact value on the same row. The chunked LM head's
autograd function is checked against autograd through plain `log_softmax(hidden @ W.T)` in float64
and with `torch.autograd.gradcheck`.
"""

from __future__ import annotations

import pytest
import torch

from dpocli.data.examples import Example
from dpocli.data.tokenization import TokenizedPair, tokenize_pair
from dpocli.model.batching import collate
from dpocli.model.logprobs import (
    CompletionScorer,
    _ChunkedTokenLogps,
    _head_is_plain_linear,
    sequence_logps,
    token_logps_from_hidden,
)

TOL = 1e-5


# torch runs single-threaded for the whole session (conftest.py).


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pairs(sample_rows, tokenizer) -> list[TokenizedPair]:
    """12 pairs of mixed lengths, standard and conversational."""
    out = []
    for i, row in enumerate(sample_rows[:12]):
        ex = Example(row["id"], i, row["prompt"], row["chosen"], row["rejected"],
                     isinstance(row["chosen"], list), "train.jsonl", i + 1)
        pair = tokenize_pair(ex, tokenizer, 1024)
        assert isinstance(pair, TokenizedPair)
        out.append(pair)
    assert len({len(p.prompt_ids) + len(p.chosen_ids) for p in out}) > 3  # padding really happens
    return out


def batch_of(pairs, pad_id=0, pad_to_multiple_of=1):
    return collate([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs],
                   [p.rejected_ids for p in pairs], pad_id, pad_to_multiple_of)


def naive_sum(model, prompt_ids, completion_ids) -> float:
    """Sum of log p(completion token | prefix), one unpadded sequence, token by token."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    total = 0.0
    for t in range(len(prompt_ids), ids.shape[1]):
        total += float(logp[t - 1, ids[0, t]])  # token t is predicted at position t-1
    return total


@pytest.fixture(scope="module")
def naive(model, pairs):
    return ([naive_sum(model, p.prompt_ids, p.chosen_ids) for p in pairs],
            [naive_sum(model, p.prompt_ids, p.rejected_ids) for p in pairs])


def test_head_is_chunked_for_tiny_llama(model):
    assert _head_is_plain_linear(model) and CompletionScorer(model).chunked


def test_sums_equal_naive_recomputation(model, pairs, naive):
    with torch.no_grad():
        out = sequence_logps(CompletionScorer(model), batch_of(pairs))
    assert out.chosen_logps.dtype == torch.float64
    assert torch.allclose(out.chosen_logps, torch.tensor(naive[0], dtype=torch.float64), rtol=0, atol=TOL)
    assert torch.allclose(out.rejected_logps, torch.tensor(naive[1], dtype=torch.float64), rtol=0, atol=TOL)


def test_lengths_are_completion_token_counts(model, pairs):
    with torch.no_grad():
        out = sequence_logps(CompletionScorer(model), batch_of(pairs), keep_token_logps=True)
    assert out.chosen_len.tolist() == [len(p.chosen_ids) for p in pairs]
    assert out.rejected_len.tolist() == [len(p.rejected_ids) for p in pairs]
    for i, p in enumerate(pairs):
        assert out.chosen_token_logps[i].shape == (len(p.chosen_ids),)
        assert out.rejected_token_logps[i].shape == (len(p.rejected_ids),)
        assert abs(float(out.chosen_token_logps[i].double().sum()) - float(out.chosen_logps[i])) < 1e-9
        assert abs(float(out.rejected_token_logps[i].double().sum()) - float(out.rejected_logps[i])) < 1e-9


def test_per_token_values_equal_naive(model, pairs):
    p = pairs[0]
    ids = torch.tensor([p.prompt_ids + p.chosen_ids])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
        out = sequence_logps(CompletionScorer(model), batch_of(pairs[:1]), keep_token_logps=True)
    n = len(p.prompt_ids)
    expected = torch.stack([logp[t - 1, ids[0, t]] for t in range(n, ids.shape[1])])
    assert out.chosen_token_logps[0].dtype == torch.float32
    assert torch.allclose(out.chosen_token_logps[0].double(), expected, rtol=0, atol=5e-6)


def test_padding_does_not_change_values(model, pairs, naive):
    scorer = CompletionScorer(model)
    with torch.no_grad():
        alone = [sequence_logps(scorer, batch_of([p])) for p in pairs[:4]]  # no padding at all
        padded = sequence_logps(scorer, batch_of(pairs, pad_to_multiple_of=64))  # lots of padding
        other_pad = sequence_logps(scorer, batch_of(pairs, pad_id=7))  # pad id is irrelevant
    for i, single in enumerate(alone):
        assert abs(float(single.chosen_logps[0]) - naive[0][i]) < TOL
        assert abs(float(single.rejected_logps[0]) - naive[1][i]) < TOL
    for out in (padded, other_pad):
        assert torch.allclose(out.chosen_logps, torch.tensor(naive[0], dtype=torch.float64), rtol=0, atol=TOL)
        assert torch.allclose(out.rejected_logps, torch.tensor(naive[1], dtype=torch.float64), rtol=0, atol=TOL)


def test_chunked_head_equals_unchunked(model, pairs):
    batch = batch_of(pairs)
    n_scored = int(batch.completion_mask[:, 1:].sum())
    plain = CompletionScorer(model)
    plain.chunked = False  # the model's own forward: full [R, T, V] logits
    with torch.no_grad():
        ref_sums, ref_tokens, _, _ = plain(batch.model_inputs())
        for chunk in (1, 3, 64, n_scored, n_scored + 100):
            sums, tokens, _, _ = CompletionScorer(model, chunk_size=chunk)(batch.model_inputs())
            assert tokens.shape == (n_scored,)
            # Not bitwise: a [1, H] @ W.T and a [R*T, H] @ W.T round differently (~1 fp32 ulp).
            assert torch.allclose(tokens, ref_tokens, rtol=0, atol=5e-6), chunk
            assert torch.allclose(sums, ref_sums, rtol=0, atol=TOL), chunk


def test_chunked_head_gradients_equal_unchunked(model, pairs):
    """Gradients of the whole model (LM head and body) through the custom autograd function equal
    those through the model's own logits."""
    batch = batch_of(pairs[:4])
    weights = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)  # an arbitrary linear loss of the sums

    def grads(chunked: bool, chunk: int):
        model.zero_grad(set_to_none=True)
        scorer = CompletionScorer(model, chunk_size=chunk)
        scorer.chunked = chunked
        sums = scorer(batch.model_inputs())[0]
        (sums * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        expected = grads(False, 1024)
        for chunk in (1, 5, 4096):
            got = grads(True, chunk)
            assert got.keys() == expected.keys()
            for name in expected:
                assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-5), (chunk, name)
    finally:
        model.zero_grad(set_to_none=True)


# --- the custom autograd function on its own, float64 ---

def small_problem(n=13, h=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, labels


def plain_token_logps(hidden, weight, labels):
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, labels[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk", [1, 4, 13, 50])
def test_forward_equals_plain_log_softmax(chunk):
    hidden, weight, labels = small_problem()
    expected = plain_token_logps(hidden, weight, labels)
    with torch.no_grad():
        assert torch.allclose(token_logps_from_hidden(hidden, weight, labels, chunk), expected,
                              rtol=0, atol=1e-12)
    got, _ = _ChunkedTokenLogps.apply(hidden.requires_grad_(), weight, labels, chunk)
    assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_fp32_inputs_give_fp32_logps():
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in small_problem())
    with torch.no_grad():
        out = token_logps_from_hidden(hidden, weight, labels, 4)
    assert out.dtype == torch.float32
    assert torch.allclose(out, plain_token_logps(hidden, weight, labels), atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 13, 50])
def test_backward_equals_autograd_of_plain_path(chunk):
    hidden, weight, labels = small_problem()
    upstream = torch.randn(hidden.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (plain_token_logps(h1, w1, labels) * upstream).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (token_logps_from_hidden(h2, w2, labels, chunk) * upstream).sum().backward()

    assert torch.allclose(h2.grad, h1.grad, rtol=0, atol=1e-12)
    assert torch.allclose(w2.grad, w1.grad, rtol=0, atol=1e-12)


def test_backward_with_only_one_input_requiring_grad():
    hidden, weight, labels = small_problem()
    h = hidden.clone().requires_grad_()
    token_logps_from_hidden(h, weight, labels, 3).sum().backward()
    h_ref = hidden.clone().requires_grad_()
    plain_token_logps(h_ref, weight, labels).sum().backward()
    assert torch.allclose(h.grad, h_ref.grad, rtol=0, atol=1e-12)

    w = weight.clone().requires_grad_()
    token_logps_from_hidden(hidden, w, labels, 3).sum().backward()
    w_ref = weight.clone().requires_grad_()
    plain_token_logps(hidden, w_ref, labels).sum().backward()
    assert torch.allclose(w.grad, w_ref.grad, rtol=0, atol=1e-12)


def test_gradcheck():
    hidden, weight, labels = small_problem(n=5, h=4, v=7, seed=3)
    assert torch.autograd.gradcheck(
        lambda h, w: _ChunkedTokenLogps.apply(h, w, labels, 2)[0],
        (hidden.requires_grad_(), weight.requires_grad_()), eps=1e-6, atol=1e-8)
