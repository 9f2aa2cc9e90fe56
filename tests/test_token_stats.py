"""TRL's per-token LM-head values (entropy, mean logit, top-1, WPO term) and LD-DPO sums, computed
inside the chunked head, against a naive full-logits recomputation in float64, for every layout.

The naive side runs one unpadded sequence at a time, `model(ids).logits` ([T, V], float64), and
applies the textbook definitions token by token; nothing is shared with dpocli.model.logprobs.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MODEL, invoke, read_jsonl
from dpocli.model.batching import collate, collate_shared
from dpocli.model.logprobs import CompletionScorer, sequence_logps
from dpocli.model.packing import collate_packed

# Unequal chosen/rejected lengths both ways, so LD-DPO's tails are non-empty on each side.
PAIRS = ([[1, 50, 60, 70, 80], [1, 44, 45], [1, 9, 10, 11, 12, 13, 14]],
         [[7, 8, 9, 2], [33, 2], [100, 101, 102, 103, 104, 2]],
         [[17, 2], [34, 35, 36, 37, 2], [200, 201, 2]])
LAYOUTS = {"padded": lambda: collate(*PAIRS, pad_id=0), "shared": lambda: collate_shared(*PAIRS, 0),
           "packed": lambda: collate_packed(*PAIRS),
           "packed_shared": lambda: collate_packed(*PAIRS, share_prefix=True)}
ALPHA = 0.3


@pytest.fixture(scope="module")
def model64():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64).eval()


def naive(model, prompt, completion) -> dict:
    """Per-token values of one sequence from its full logits, by the definitions."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].double()  # rows predicting the completion
    labels = torch.tensor(completion)
    logp = logits.log_softmax(-1)
    p = logp.exp()
    token_logp = logp.gather(1, labels[:, None]).squeeze(1)
    return {"logp": token_logp,
            "entropy": -(p * logp).sum(-1),
            "mean_logit": logits.sum(-1) / logits.shape[-1],
            "top1": (logits.argmax(-1) == labels).double(),
            "wpo": token_logp - torch.log((p * p).sum(-1))}


@pytest.fixture(scope="module")
def expected(model64) -> list[dict]:
    """Per segment (chosen 0..B-1, rejected B..2B-1): naive per-token values."""
    prompts, chosens, rejecteds = PAIRS
    return ([naive(model64, p, c) for p, c in zip(prompts, chosens)]
            + [naive(model64, p, r) for p, r in zip(prompts, rejecteds)])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_stats_equal_full_logits(layout, chunk, model64, expected):
    with torch.no_grad():
        out = sequence_logps(CompletionScorer(model64, chunk_size=chunk), LAYOUTS[layout](), token_stats=True)
    for name, got in (("entropy", out.stats.entropy), ("mean_logit", out.stats.mean_logit),
                      ("top1", out.stats.top1), ("wpo", out.stats.wpo_logps)):
        want = torch.stack([e[name].sum() for e in expected])
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0, msg=f"{layout} {name}")
    assert out.stats.top1.sum() > 0  # the tiny model predicts some of these tokens: the check can fail


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ld_alpha_sums_and_gradients(layout, model64, expected):
    b = len(PAIRS[0])
    lens = [len(e["logp"]) for e in expected]
    want = []
    for seg, e in enumerate(expected):
        shared = min(lens[seg % b], lens[b + seg % b])
        want.append(float(e["logp"][:shared].sum() + ALPHA * e["logp"][shared:].sum()))
    out = sequence_logps(CompletionScorer(model64, chunk_size=4), LAYOUTS[layout](), ld_alpha=ALPHA)
    got = torch.cat([out.chosen_logps, out.rejected_logps])
    # 1e-6, not 1e-9: with gradients on, Llama's RMSNorm runs its fp32 path (see test_packing.py).
    torch.testing.assert_close(got.detach(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
    plain = torch.stack([e["logp"].sum() for e in expected[:b]])
    torch.testing.assert_close(out.chosen_plain_logps.detach(), plain, atol=1e-6, rtol=0)
    assert any(abs(w - float(e["logp"].sum())) > 1e-3 for w, e in zip(want, expected))  # α really applies
    got.sum().backward()  # differentiable through the weighted sum
    assert model64.get_output_embeddings().weight.grad is not None
    model64.zero_grad(set_to_none=True)


def test_no_stats_unless_asked(model64):
    with torch.no_grad():
        out = sequence_logps(CompletionScorer(model64), LAYOUTS["padded"]())
    assert out.stats is None and out.chosen_plain_logps is None


# ---------------------------------------------------------------- the CLI flags

def test_ld_alpha_without_token_logps_is_refused_before_writing(small_cache, tmp_path):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--ld-alpha", 0.5])
    assert result.exit_code == 2
    error = result.stderr.strip().splitlines()[0]
    assert error.startswith("error:") and "--ld-alpha" in error and "per-token" in error
    assert "--token-logps" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, flag", [(["--ld-alpha", 1.5], "--ld-alpha"),
                                        (["--use-weighting", "--loss", "aot"], "use_weighting")])
def test_bad_values_are_refused(small_cache, tmp_path, args, flag):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", *args])
    assert result.exit_code == 2 and flag in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_flags_in_help_and_print_config():
    help_text = invoke(["train", "--help"]).stdout
    assert "--use-weighting" in help_text and "--ld-alpha" in help_text
    printed = invoke(["train", "--print-config"])  # the template of every option and its default
    assert printed.exit_code == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert "use-weighting = false" in lines and "# ld-alpha =" in lines


# ---------------------------------------------------------------- eval: the same definitions

def test_eval_metrics_equal_training_step_one(small_cache, tmp_path):
    """With the weights of step 1 (policy = reference) and one batch holding every pair, `dpo eval`'s
    LM-head metrics over the cache equal the first training step's."""
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--max-steps", 1,
                     "--batch-size", 48, "--quiet"])
    assert result.exit_code == 0, result.stderr
    step = read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]
    evaluated = json.loads(invoke(["eval", small_cache, "--model", MODEL, "--json", "--quiet"]).stdout)
    m = evaluated["models"][0]
    for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert m[key] == pytest.approx(step[key], abs=1e-6), key
    assert 0 < m["mean_token_accuracy"] < 1 and m["entropy"] > 0


def test_periodic_eval_with_wpo_and_ld_alpha(tmp_path, small_prefs):
    cache = tmp_path / "c"
    assert invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", cache, "--token-logps",
                   "--quiet"]).exit_code == 0
    result = invoke(["train", cache, "--model", MODEL, "--out", tmp_path / "r", "--max-steps", 1,
                     "--batch-size", 48, "--eval-cache", cache, "--eval-every", 1, "--use-weighting",
                     "--ld-alpha", 0.5, "--quiet"])
    assert result.exit_code == 0, result.stderr
    records = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 1 and "eval_entropy" in evals[0] and "eval_mean_token_accuracy" in evals[0]
    # WPO weights are < 1, so the weighted loss sits below the unweighted ln 2 at step 1
    assert records[0]["loss"] < 0.69
