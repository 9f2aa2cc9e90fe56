"""Every logged metric, defined once, under TRL's names.

Per pair i, with Δw = policy_chosen_logps − ref_chosen_logps and Δl likewise for rejected
(log-probs are SUMS over completion tokens):

    rewards/chosen      mean_i β·Δw_i               rewards/rejected  mean_i β·Δl_i
    rewards/margins     mean_i β·(Δw_i − Δl_i)      rewards/accuracies mean_i 1[β·Δw_i > β·Δl_i]
                                                     (strict: a tie, e.g. policy == reference, counts 0)
    logps/chosen        mean_i policy_chosen_logps_i (a sum per pair, averaged over pairs; TRL's docs
    logps/rejected      mean_i policy_rejected_logps_i  call it an average per token, the code sums)
    loss                the optimised loss: Σ_k w_k · mean_i loss_k,i
    loss/<type>         mean_i loss_k,i for each loss type when several are combined
    aux_loss            MoE only: the router load-balancing loss of each micro-batch, pair-weighted

All means are over pairs (example-weighted). Within an optimizer step they run over every pair of
every micro-batch on every rank, which equals TRL's mean of per-batch means when batches are equal.

Token metrics, from the LM head (TRL 1.16's `_compute_loss`, all detached): per micro-batch, a
ratio of sums over the completion tokens of every rank, then the mean of those ratios over the
step's micro-batches (TRL logs one value per micro-batch and averages them; 0 when a ratio has no
tokens):

    entropy             Σ_t H_t / #tokens, over chosen AND rejected completion tokens
    logits/chosen       Σ_t mean_v z_t,v / #tokens, chosen completion tokens   (likewise rejected)
    mean_token_accuracy Σ_t 1[argmax_v z_t,v = y_t] / #tokens, chosen completion tokens only
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpocli.errors import DpocliError
from dpocli.io.atomic import atomic_write_text
from dpocli.io.write_failures import write_failure
from dpocli.objective.losses import LossInputs, LossOutput, LossSpec, compute_loss

LENGTH_BUCKETS = [(-10**9, -9, "<=-9"), (-8, -3, "-8..-3"), (-2, 2, "-2..2"), (3, 8, "3..8"),
                  (9, 10**9, ">=9")]
PERCENTILES = (5, 25, 50, 75, 95)


class StepMetrics:
    """Accumulates pair-weighted sums over the micro-batches of a step, then reduces over ranks."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.pairs = 0
        self.token_parts: list[torch.Tensor] = []  # per micro-batch: the sums of TOKEN_METRICS

    # name -> (numerator, denominator) positions in a micro-batch's `token_parts` vector
    TOKEN_METRICS = {"entropy": (0, 1), "logits/chosen": (2, 3), "logits/rejected": (4, 5),
                     "mean_token_accuracy": (6, 3)}

    def add_tokens(self, policy, real: bool = True) -> None:
        """The LM-head sums of one micro-batch (a `SequenceLogps` with `stats`). Every rank adds
        every micro-batch, a rank without real rows as zeros, so the all-reduce lines up."""
        st, b = policy.stats, policy.chosen_len.shape[0]
        c_len, r_len = policy.chosen_len.double().sum(), policy.rejected_len.double().sum()
        parts = torch.stack([st.entropy.sum(), c_len + r_len, st.mean_logit[:b].sum(), c_len,
                             st.mean_logit[b:].sum(), r_len, st.top1[:b].sum()]).double()
        self.token_parts.append(parts if real else torch.zeros_like(parts))

    def add(self, out: LossOutput, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> None:
        n = out.chosen_rewards.shape[0]
        cr, rr = out.chosen_rewards.double(), out.rejected_rewards.double()
        names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                 "rewards/margins", "logps/chosen", "logps/rejected"]
        parts = [out.loss.detach().double() * n, cr.sum(), rr.sum(), (cr > rr).double().sum(),
                 (cr - rr).sum(), policy_chosen.detach().double().sum(),
                 policy_rejected.detach().double().sum()]
        if len(out.components) > 1:
            names += [f"loss/{k}" for k in out.components]
            parts += [v.double() * n for v in out.components.values()]
        if out.aux_loss is not None:  # MoE: TRL logs the router load-balancing loss as aux_loss
            names.append("aux_loss")
            parts.append(out.aux_loss.double() * n)
        # One device-to-host copy per micro-batch: on GPU every float() would be a sync point.
        for key, value in zip(names, torch.stack(parts).tolist()):
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.pairs += n

    def means(self, dist) -> dict[str, float]:
        """Means over all pairs of all ranks (one all-reduce, a sync point)."""
        keys = sorted(self.sums)
        micro = (torch.stack(self.token_parts).cpu() if self.token_parts
                 else torch.zeros((0, 7), dtype=torch.float64))
        packed = torch.cat([torch.tensor([self.sums[k] for k in keys] + [float(self.pairs)],
                                         dtype=torch.float64), micro.flatten()])
        dist.all_reduce_sum_(packed)
        total = packed[len(keys)].item()
        out = {k: packed[i].item() / total for i, k in enumerate(keys)}
        micro = packed[len(keys) + 1:].view(-1, 7)
        for name, (num, den) in self.TOKEN_METRICS.items() if len(micro) else ():
            ratios = [n / d if d > 0 else 0.0 for n, d in zip(micro[:, num].tolist(), micro[:, den].tolist())]
            out[name] = sum(ratios) / len(ratios)
        return out


def pair_metrics(policy, ref, spec: LossSpec) -> tuple[dict, dict]:
    """(summary metrics, per-pair columns) of a policy's sums (a `SequenceLogps`) over a whole
    evaluation set against its cached reference values (a `RefLogps`); definitions in evaluate.py."""
    out = compute_loss(LossInputs.from_logps(policy, ref), spec)
    pc, pr = policy.chosen_logps, policy.rejected_logps
    cr, rr = out.chosen_rewards, out.rejected_rewards
    margin = cr - rr
    correct = (cr > rr).double()
    prob = torch.sigmoid(margin)
    clen, rlen = ref.chosen_len.double(), ref.rejected_len.double()
    m = {
        "loss": float(out.loss),
        "rewards/accuracies": float(correct.mean()),
        "rewards/margins": float(margin.mean()),
        "rewards/margins_std": float(margin.std(unbiased=False)),
        **{f"rewards/margins_p{q}": float(torch.quantile(margin, q / 100)) for q in PERCENTILES},
        "rewards/chosen": float(cr.mean()),
        "rewards/rejected": float(rr.mean()),
        "logps/chosen": float(pc.mean()),
        "logps/rejected": float(pr.mean()),
        "logps/chosen_per_token": float(pc.sum() / clen.sum()),
        "logps/rejected_per_token": float(pr.sum() / rlen.sum()),
        "preference_prob/mean": float(prob.mean()),
        "displacement/chosen_below_ref": float((pc < ref.chosen_logps).double().mean()),
        "displacement/rejected_below_ref": float((pr < ref.rejected_logps).double().mean()),
        "pairs": int(pc.shape[0]),
    }
    if len(out.components) > 1:
        m.update({f"loss/{k}": float(v) for k, v in out.components.items()})
    if out.aux_loss is not None:  # MoE: `loss` holds coef x this (TRL logs eval_aux_loss)
        m["aux_loss"] = float(out.aux_loss)
    if policy.stats is not None:
        m.update(token_metrics(policy.stats, clen, rlen))
    diff = (ref.chosen_len - ref.rejected_len)
    for low, high, name in LENGTH_BUCKETS:
        inside = (diff >= low) & (diff <= high)
        n = int(inside.sum())
        m[f"length_bias/{name}/count"] = n
        m[f"length_bias/{name}/accuracy"] = float(correct[inside].mean()) if n else None
    columns = {"chosen_reward": cr, "rejected_reward": rr, "margin": margin,
               "preference_prob": prob, "correct": correct.bool(), "policy_chosen_logps": pc,
               "policy_rejected_logps": pr}
    return m, columns


def token_metrics(stats, chosen_len: torch.Tensor, rejected_len: torch.Tensor) -> dict[str, float]:
    """TRL's LM-head metrics over a whole set of pairs (token-weighted; definitions at the top)."""
    n = chosen_len.shape[0]
    c_tokens, r_tokens = float(chosen_len.sum()), float(rejected_len.sum())

    def ratio(total, tokens: float) -> float:
        return float(total) / tokens if tokens > 0 else 0.0
    return {"entropy": ratio(stats.entropy.sum(), c_tokens + r_tokens),
            "logits/chosen": ratio(stats.mean_logit[:n].sum(), c_tokens),
            "logits/rejected": ratio(stats.mean_logit[n:].sum(), r_tokens),
            "mean_token_accuracy": ratio(stats.top1[:n].sum(), c_tokens)}


def rename_for_eval(metrics: dict) -> dict:
    return {f"eval_{k}": v for k, v in metrics.items()}


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl, flushed at every write."""

    def __init__(self, path: Path, enabled: bool = True, sinks: list | None = None):
        self.path = path
        self.enabled = enabled
        self.sinks = sinks or []  # optional TensorBoard / W&B writers (dpocli/train/dashboards.py)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint we resume from (they will be redone).

        A last line cut short by a kill is dropped too; a damaged line elsewhere is an error."""
        if not (self.enabled and self.path.exists()):
            return
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                if number == len(lines):
                    break  # a write cut by the kill that stopped the run
                raise DpocliError("is not valid JSON", file=self.path, row=number,
                                  hint="fix or delete that line, then resume") from None
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as err:
            raise write_failure(self.path, err) from None
        for sink in self.sinks:
            sink.write(record)

    def last_record_with(self, key: str) -> dict:
        """The newest logged record that has `key` ({} when there is none, or on other ranks)."""
        if not (self.enabled and self.path.exists()):
            return {}
        last = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line) if line.strip() else {}
            if key in record:
                last = record
        return last

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
