"""The one-call FlexAttention kernel (`DPOCLI_ATTN_KERNEL=flex`) computes what the per-sequence SDPA
kernel computes, on CPU (forward only: torch has no CPU backward for FlexAttention), and the
kernel choice is made once and recorded."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MODEL, invoke, ref_values
from dpocli.errors import DpocliError
from dpocli.model import attention
from dpocli.model.attention import (
    ENV,
    enable_packed_attention,
    flex_packed_attention,
    layout_tensors,
    packed_attention,
    packed_mask_mod,
)
from dpocli.model.batching import collate, collate_shared
from dpocli.model.logprobs import CompletionScorer, sequence_logps
from dpocli.model.packing import collate_packed

pytest.importorskip("torch.nn.attention.flex_attention")
# On CPU the eager, unfused FlexAttention is the point (fp64, no compiler): its warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PAIRS = ([[1, 50, 60, 70, 80], [1, 44, 45], [1, 9, 10, 11, 12, 13, 14]],
         [[90, 91, 92], [7, 8, 2], [20, 2]],
         [[93, 94], [30, 31, 32, 33, 2], [2]])


@pytest.fixture(autouse=True)
def sdpa_afterwards(monkeypatch):
    """The attention registry is process-wide: put the default kernel back after every test, so
    no other test file runs under flex."""
    yield
    monkeypatch.delenv(ENV, raising=False)
    from transformers import AttentionInterface
    AttentionInterface.register("dpocli_packed", packed_attention)
    attention._FlexState.units, attention._FlexState.masks = None, {}


def _dense(mask_mod, n: int) -> torch.Tensor:
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return mask_mod(0, 0, q, kv)


@pytest.mark.parametrize("share_prefix", [False, True])
def test_the_mask_is_the_layouts_own_pattern(share_prefix):
    """Expected pattern from an independent construction: the dense masks of the padded layouts
    (causal per sequence; `collate_shared`'s prefix-sharing mask), laid block-diagonally."""
    packed = collate_packed(*PAIRS, share_prefix=share_prefix)
    n = packed.num_tokens
    blocks = []
    for p, c, r in zip(*PAIRS):
        if share_prefix:
            allowed = collate_shared([p], [c], [r], pad_id=0).attention_mask[0, 0] == 0
            blocks.append(allowed)
        else:
            blocks += [torch.ones(len(p) + len(x), len(p) + len(x)).tril().bool() for x in (c, r)]
    expected = torch.block_diag(*blocks)
    got = _dense(packed_mask_mod(layout_tensors(packed.units, n, "cpu"), None), n)
    assert torch.equal(got, expected)


def test_padding_forms_its_own_unit_and_the_window_counts_positions():
    packed = collate_packed([[1, 5]], [[6, 7]], [[8, 9, 10]], share_prefix=True)
    t = layout_tensors(packed.units, 9, "cpu")  # 7 tokens + 2 pad
    assert t["position"].tolist()[:7] == packed.position_ids[0].tolist()
    dense = _dense(packed_mask_mod(t, None), 9)
    assert not dense[:7, 7:].any() and not dense[7:, :7].any()  # pads and tokens never mix
    assert dense[8, 7] and dense[7, 7]  # every pad row attends somewhere (no NaN)
    # window 2: the branch token r1 (position 3) sees r0 (position 2) but not p1 (position 1)
    windowed = _dense(packed_mask_mod(t, 2), 9)
    assert windowed[5, 4] and not windowed[5, 1] and dense[5, 1]


def _logps(model, batch, kernel, monkeypatch):
    monkeypatch.setenv(ENV, kernel)
    enable_packed_attention(model)
    with torch.no_grad():
        return sequence_logps(CompletionScorer(model, chunk_size=4), batch)


@pytest.fixture(scope="module")
def llama():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(MODEL).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_flex_equals_per_sequence_sdpa(llama, monkeypatch, share_prefix, dtype, tol):
    model = llama.to(dtype)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA covered
    batch = collate_packed(*PAIRS, share_prefix=share_prefix)
    a = _logps(model, batch, "sdpa", monkeypatch)
    b = _logps(model, batch, "flex", monkeypatch)
    assert model.config._attn_implementation == "dpocli_packed"
    torch.testing.assert_close(b.chosen_logps, a.chosen_logps, atol=tol, rtol=0)
    torch.testing.assert_close(b.rejected_logps, a.rejected_logps, atol=tol, rtol=0)
    padded = _logps(model, collate(*PAIRS, pad_id=0), "flex", monkeypatch)  # not packed: SDPA
    torch.testing.assert_close(b.chosen_logps, padded.chosen_logps, atol=tol, rtol=0)
    model.float()


def test_a_mask_that_lets_branches_see_the_chosen_tokens_scores_differently(llama, monkeypatch):
    """The control: the comparison above can fail. A mask_mod that drops the "branch sees only
    the prompt" rule changes the rejected scores that depend on the branch's attention (pairs 0
    and 1; pair 2's one rejected token is predicted from the prompt's last position) and no
    chosen score."""
    model = llama.double()
    batch = collate_packed(*PAIRS, share_prefix=True)
    good = _logps(model, batch, "flex", monkeypatch)

    def leaky(t, window):
        doc = t["doc"]
        return lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q)

    monkeypatch.setattr(attention, "packed_mask_mod", leaky)
    attention._FlexState.units = None
    bad = _logps(model, batch, "flex", monkeypatch)
    torch.testing.assert_close(bad.chosen_logps, good.chosen_logps, atol=1e-12, rtol=0)
    assert ((bad.rejected_logps - good.rejected_logps).abs()[:2] > 1e-3).all()
    model.float()


def test_sliding_window_matches_sdpa_and_the_padded_layout(monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=3, max_window_layers=0,
                         layer_types=["sliding_attention"] * 2)
    model = Qwen2ForCausalLM(config).double().eval()
    for share_prefix in (False, True):
        batch = collate_packed(*PAIRS, share_prefix=share_prefix)
        flex = _logps(model, batch, "flex", monkeypatch)
        sdpa = _logps(model, batch, "sdpa", monkeypatch)
        padded = _logps(model, collate(*PAIRS, pad_id=0), "sdpa", monkeypatch)
        for other in (sdpa, padded):
            torch.testing.assert_close(flex.chosen_logps, other.chosen_logps, atol=1e-12, rtol=0)
            torch.testing.assert_close(flex.rejected_logps, other.rejected_logps, atol=1e-12, rtol=0)
    model.config.sliding_window = 1000  # the window must matter, or the test proves nothing
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 1000
    attention._FlexState.units = None
    wide = _logps(model, batch, "flex", monkeypatch)
    assert (wide.rejected_logps - flex.rejected_logps).abs().max() > 1e-3


def test_the_kernel_is_chosen_once_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert attention.packed_kernel() is packed_attention
    assert attention.describe(True, None) == "packed-sdpa"
    assert attention.describe(False, "eager") == "eager"
    assert attention.describe(False, None) == "default"
    monkeypatch.setenv(ENV, "flex")
    assert attention.packed_kernel() is flex_packed_attention
    assert attention.describe(True, None) == "packed-flex"
    monkeypatch.setenv(ENV, "varlen")
    with pytest.raises(DpocliError, match="unknown attention kernel"):
        attention.packed_kernel()


def test_cpu_training_refuses_flex(llama, monkeypatch):
    monkeypatch.setenv(ENV, "flex")
    enable_packed_attention(llama)
    with pytest.raises(DpocliError, match="no CPU backward"):
        sequence_logps(CompletionScorer(llama), collate_packed(*PAIRS))


def test_precompute_records_the_kernel_and_agrees_with_sdpa(tmp_path, small_prefs, small_cache,
                                                           monkeypatch):
    monkeypatch.setenv(ENV, "flex")
    out = tmp_path / "flex"
    result = invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", out,
                     "--rows-per-shard", 16, "--batch-size", 8, "--packing", "--prefix-sharing",
                     "--quiet"])
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["created"]["attention_kernel"] == "packed-flex"
    plain = json.loads((small_cache / "manifest.json").read_text())
    assert plain["created"]["attention_kernel"] == "default"
    flex, ref = ref_values(out), ref_values(small_cache)
    assert flex.keys() == ref.keys()
    worst = max(abs(a - b) for k in ref for a, b in zip(flex[k], ref[k]))
    assert worst < 1e-4, worst  # fp32 sums of up to ~100 tokens, three different layouts
