"""`dpo eval`: every metric against hand arithmetic, the reference-on-its-own-cache invariant,
per-example rows that aggregate to the summary, and a trained checkpoint beating the reference."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from conftest import MODEL, invoke, read_jsonl
from dpocli.eval.evaluate import expand_models
from dpocli.model.logprobs import SequenceLogps
from dpocli.objective.losses import LossSpec
from dpocli.objective.metrics import pair_metrics
from dpocli.scoring.replay import RefLogps


def test_every_metric_against_hand_computation():
    # Four pairs. Δw = pc - ref_c, Δl = pr - ref_r:
    #   Δw = [1, -1, 1, 0],  Δl = [-1, 1, -3, -0.5]  ->  h = [2, -2, 4, 0.5];  β = 0.5
    pc = torch.tensor([-10.0, -20.0, -5.0, -8.0], dtype=torch.float64)
    pr = torch.tensor([-12.0, -18.0, -9.0, -8.0], dtype=torch.float64)
    ref = RefLogps(chosen_logps=torch.tensor([-11.0, -19.0, -6.0, -8.0], dtype=torch.float64),
                   rejected_logps=torch.tensor([-11.0, -19.0, -6.0, -7.5], dtype=torch.float64),
                   chosen_len=torch.tensor([4, 10, 2, 3]), rejected_len=torch.tensor([5, 2, 12, 3]))
    policy = SequenceLogps(pc, pr, ref.chosen_len, ref.rejected_len)
    m, cols = pair_metrics(policy, ref, LossSpec(beta=0.5))
    margins = [1.0, -1.0, 2.0, 0.25]  # β·h
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert m["loss"] == pytest.approx(sum(-math.log(sig(x)) for x in margins) / 4, abs=1e-12)
    assert m["rewards/accuracies"] == 0.75
    assert m["rewards/margins"] == pytest.approx(sum(margins) / 4)
    mean = sum(margins) / 4
    assert m["rewards/margins_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in margins) / 4))
    # numpy-style linear interpolation: sorted [-1, 0.25, 1, 2]; p50 = (0.25 + 1) / 2
    assert m["rewards/margins_p50"] == pytest.approx(0.625)
    assert m["rewards/margins_p25"] == pytest.approx(-1 + 0.75 * 1.25)
    assert m["rewards/chosen"] == pytest.approx(0.5 * (1 - 1 + 1 + 0) / 4)
    assert m["rewards/rejected"] == pytest.approx(0.5 * (-1 + 1 - 3 - 0.5) / 4)
    assert m["logps/chosen"] == pytest.approx(-43 / 4)
    assert m["logps/rejected"] == pytest.approx(-47 / 4)
    assert m["logps/chosen_per_token"] == pytest.approx(-43 / 19)
    assert m["logps/rejected_per_token"] == pytest.approx(-47 / 22)
    assert m["preference_prob/mean"] == pytest.approx(sum(sig(x) for x in margins) / 4)
    assert m["displacement/chosen_below_ref"] == 0.25  # only pair 2 (-20 < -19)
    assert m["displacement/rejected_below_ref"] == 0.75  # pairs 1, 3, 4
    # length difference chosen - rejected: [-1, 8, -10, 0] -> buckets -2..2 (pairs 1, 4), 3..8, <=-9
    assert m["length_bias/-2..2/count"] == 2 and m["length_bias/-2..2/accuracy"] == 1.0
    assert m["length_bias/3..8/count"] == 1 and m["length_bias/3..8/accuracy"] == 0.0
    assert m["length_bias/<=-9/count"] == 1 and m["length_bias/<=-9/accuracy"] == 1.0
    assert m["length_bias/>=9/count"] == 0 and m["length_bias/>=9/accuracy"] is None
    assert cols["correct"].tolist() == [True, False, True, True]


def test_reference_scored_on_its_own_cache_is_exactly_neutral(small_cache):
    result = invoke(["eval", small_cache, "--model", MODEL, "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    m = json.loads(result.stdout)["models"][0]
    assert m["rewards/margins"] == 0.0 and m["rewards/accuracies"] == 0.0
    assert m["rewards/chosen"] == 0.0 and m["rewards/rejected"] == 0.0
    assert m["loss"] == math.log(2)
    assert m["preference_prob/mean"] == 0.5
    assert m["displacement/chosen_below_ref"] == 0.0


@pytest.mark.slow  # the one-epoch sample run it needs takes ~40 s
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_per_example_rows_aggregate_to_the_summary(trained_run, heldout_cache, tmp_path, suffix):
    out = tmp_path / f"per{suffix}"
    result = invoke(["eval", heldout_cache, "--model", trained_run, "--per-example", out, "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    m = json.loads(result.stdout)["models"][0]
    rows = pq.read_table(out).to_pylist() if suffix == ".parquet" else read_jsonl(out)
    assert len(rows) == m["pairs"]
    n = len(rows)
    assert sum(r["correct"] for r in rows) / n == pytest.approx(m["rewards/accuracies"])
    assert sum(r["margin"] for r in rows) / n == pytest.approx(m["rewards/margins"])
    assert sum(r["chosen_reward"] for r in rows) / n == pytest.approx(m["rewards/chosen"])
    assert sum(r["preference_prob"] for r in rows) / n == pytest.approx(m["preference_prob/mean"])
    assert sum(r["policy_chosen_logps"] for r in rows) / n == pytest.approx(m["logps/chosen"])
    assert sum(-math.log(r["preference_prob"]) for r in rows) / n == pytest.approx(m["loss"])
    for r in rows[:20]:  # each row is internally consistent with β = 0.1
        assert r["chosen_reward"] == pytest.approx(0.1 * (r["policy_chosen_logps"] - r["ref_chosen_logps"]))
        assert r["correct"] == (r["margin"] > 0)


@pytest.mark.slow
def test_trained_checkpoint_beats_the_reference_on_heldout(trained_run, heldout_cache):
    result = invoke(["eval", heldout_cache, "--model", MODEL, "--model", trained_run, "--json", "--quiet"])
    ref, trained = json.loads(result.stdout)["models"]
    assert trained["rewards/accuracies"] > 0.75 > ref["rewards/accuracies"]
    assert trained["loss"] < ref["loss"] and trained["preference_prob/mean"] > 0.6


def test_globbed_checkpoints_come_in_step_order(tmp_path):
    for step in (10, 2, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    found = expand_models([str(tmp_path / "checkpoint-*")])
    assert [p.rsplit("-", 1)[1] for p in found] == ["2", "10", "100"]


def test_samples_and_kl_of_the_reference_against_itself(small_cache):
    result = invoke(["eval", small_cache, "--model", MODEL, "--samples", 2, "--ref-model", MODEL,
                     "--kl-samples", 2, "--max-new-tokens", 8, "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    samples = json.loads(result.stdout)["models"][0]["samples"]
    assert len(samples["generations"]) == 2
    assert samples["generations"][0]["policy"] == samples["generations"][0]["reference"]  # greedy, same model
    assert samples["kl_policy_ref"]["estimate"] == 0.0 and samples["kl_policy_ref"]["samples"] > 0


def test_periodic_eval_during_training_equals_dpo_eval_of_the_checkpoint(small_cache, tmp_path):
    """One metrics path: the eval_* line a run logs at step 2 is `dpo eval` of checkpoint-2."""
    run = tmp_path / "run"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 2,
                     "--batch-size", 4, "--lr", "5e-4", "--eval-cache", small_cache, "--eval-every", 2,
                     "--save-every", 2, "--quiet"])
    assert result.exit_code == 0, result.stderr
    logged = next(r for r in read_jsonl(run / "metrics.jsonl") if r["step"] == 2 and "eval_loss" in r)
    result = invoke(["eval", small_cache, "--model", run / "checkpoint-2", "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    direct = json.loads(result.stdout)["models"][0]
    assert direct["rewards/accuracies"] > 0  # trained: the comparison is not between two zeros
    for key, value in direct.items():
        if key in ("model", "samples", "eval_runtime", "eval_samples_per_second"):
            continue  # timings differ from run to run; both carry them (test_run_summary.py)
        assert logged[f"eval_{key}"] == value, key  # same code, same batches: bit for bit


# ---------------------------------------------------------------- WPO and LD-DPO in eval (TRL evaluates
# with the training loss config)

@pytest.fixture(scope="module")
def wpo_ld_run(tmp_path_factory, small_prefs) -> dict:
    """A --token-logps cache and a 2-step run trained on it with --use-weighting --ld-alpha 0.3."""
    root = tmp_path_factory.mktemp("wpo-ld")
    result = invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", root / "cache", "--token-logps",
                     "--quiet"])
    assert result.exit_code == 0, result.stderr
    result = invoke(["train", root / "cache", "--model", MODEL, "--out", root / "run", "--max-steps", 2,
                     "--batch-size", 8, "--lr", "5e-4", "--use-weighting", "--ld-alpha", 0.3, "--quiet"])
    assert result.exit_code == 0, result.stderr
    return {"cache": root / "cache", "run": root / "run"}


def _recomputed_loss(model_dir, cache_dir, beta: float, alpha: float | None, weighting: bool) -> float:
    """The sigmoid loss over a cache from first principles: one unpadded forward per completion,
    full-vocabulary log-softmax, LD-DPO sums Σ_{t<ℓ} + α·Σ_{t>=ℓ} (ℓ = the shorter completion of the
    pair) for policy and cached reference token log-probs, and WPO weights
    exp(mean_t(log p_t − log Σ_v p_v²)) of chosen times rejected (arXiv 2409.06411, 2406.11827)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [r for shard in sorted(cache_dir.glob("part-*.parquet")) for r in pq.read_table(shard).to_pylist()]

    def token_terms(prompt, completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)[len(prompt) - 1:]
        picked = logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        return picked, picked - torch.logsumexp(2 * logp, -1)  # log p_t, log p_t − log Σ_v p_v²

    def ld(tokens, shared):
        tokens = torch.as_tensor(tokens, dtype=torch.float64)
        return float(tokens.sum() if alpha is None else tokens[:shared].sum() + alpha * tokens[shared:].sum())
    losses = []
    for r in rows:
        pc, wc = token_terms(r["prompt_ids"], r["chosen_ids"])
        pr, wr = token_terms(r["prompt_ids"], r["rejected_ids"])
        shared = min(len(pc), len(pr))
        h = (ld(pc, shared) - ld(r["ref_chosen_token_logps"], shared)) - \
            (ld(pr, shared) - ld(r["ref_rejected_token_logps"], shared))
        weight = math.exp(float(wc.mean()) + float(wr.mean())) if weighting else 1.0
        losses.append(math.log1p(math.exp(-beta * h)) * weight)
    return sum(losses) / len(losses)


def test_eval_loss_with_wpo_and_ld_alpha_equals_a_recomputation(wpo_ld_run):
    result = invoke(["eval", wpo_ld_run["cache"], "--model", wpo_ld_run["run"], "--use-weighting",
                     "--ld-alpha", 0.3, "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)["models"][0]["loss"]
    want = _recomputed_loss(wpo_ld_run["run"], wpo_ld_run["cache"], 0.1, 0.3, True)
    assert got == pytest.approx(want, abs=1e-7)  # 0.60206644 both, 7e-10 apart (fp32 forwards)
    # Each option alone moves the loss by ~6e-5 or more: the check would see either one missing.
    for alpha, weighting in ((None, True), (0.3, False)):
        other = _recomputed_loss(wpo_ld_run["run"], wpo_ld_run["cache"], 0.1, alpha, weighting)
        assert abs(other - want) > 1e-5, (alpha, weighting)


def test_eval_of_a_wpo_ld_run_takes_its_options(wpo_ld_run):
    from_run = json.loads(invoke(["eval", wpo_ld_run["cache"], "--model", wpo_ld_run["run"], "--json",
                                  "--quiet"]).stdout)
    explicit = json.loads(invoke(["eval", wpo_ld_run["cache"], "--model", wpo_ld_run["run"], "--use-weighting",
                                  "--ld-alpha", 0.3, "--json", "--quiet"]).stdout)
    assert from_run["loss_options"]["use_weighting"] is True and from_run["loss_options"]["ld_alpha"] == 0.3
    assert from_run["loss_options_from"] == [str(wpo_ld_run["run"] / "run_config.json")]
    assert from_run["models"][0]["loss"] == explicit["models"][0]["loss"]


def test_eval_ld_alpha_needs_a_token_logps_cache(small_cache, wpo_ld_run):
    for args in (["--model", MODEL, "--ld-alpha", 0.5], ["--model", wpo_ld_run["run"]]):  # given; the run's
        result = invoke(["eval", small_cache, *args])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1, result.stderr
        assert "--ld-alpha" in errors[0] and "per-token" in errors[0]
