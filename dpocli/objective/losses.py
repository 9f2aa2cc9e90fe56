"""Preference losses as pure functions of per-pair log-prob sums; one function per TRL `loss_type`.

Invariants:
- Every loss maps `(LossInputs, LossSpec)` to a `[B]` per-pair loss in the inputs' dtype; no I/O, no model.
- Formulas match TRL 1.16's `DPOTrainer._compute_loss`. Where we differ it is only in a numerically
  stable rewrite of the same expression (noted at the function), or in `cdpo`, a loss TRL 1.16 lacks.
- Options TRL 1.16 rejects or silently ignores are refused by `validate_spec` (one-line error):
  label smoothing that no listed loss uses, `exo_pair` with ε = 0, an f-divergence on a loss TRL
  does not generalise.
- Implicit rewards always use the plain log-ratios, even under an f-divergence (as TRL does).
- Completion lengths are clamped to >= 1 before dividing, as TRL clamps its mask sums.

Notation (paper symbol -> code): y_w, y_l = chosen, rejected completion; log π(y_w|x) =
`policy_chosen_logps`; log π_ref(y_w|x) = `ref_chosen_logps`; |y_w| = `chosen_len`;
Δw = policy_chosen - ref_chosen, Δl = policy_rejected - ref_rejected (`_logratios`);
s = g(Δ) the f-divergence score (`_scores`); δ = s_w - s_l; β = `beta`; ε = `label_smoothing`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dpocli.errors import DpocliError
from dpocli.options import LossOpts, composed_fields


@dataclass(frozen=True)
class LossInputs:
    """Per-pair [B] tensors. *_logps are SUMS of completion-token log-probs; *_len are completion
    token counts."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_len: Tensor
    rejected_len: Tensor
    # WPO (`LossSpec.use_weighting`): Σ_t (log p(y_t) - log Σ_v p_v²) per completion, detached.
    chosen_wpo_logps: Tensor | None = None
    rejected_wpo_logps: Tensor | None = None
    # Under LD-DPO the *_logps above are length-desensitised; `sft` uses the plain chosen sums (as TRL).
    policy_chosen_plain_logps: Tensor | None = None
    # MoE: the forward's router load-balancing loss (scalar), added with `LossSpec.router_aux_loss_coef`.
    router_aux_loss: Tensor | None = None

    @classmethod
    def from_logps(cls, policy, ref) -> "LossInputs":
        """The loss inputs of a batch: the policy's sums (a `logprobs.SequenceLogps`) against the
        cached reference values (a `scoring.RefLogps`), whose completion lengths are used."""
        b = policy.chosen_logps.shape[0]
        wpo = policy.stats.wpo_logps if policy.stats is not None else None
        return cls(policy.chosen_logps, policy.rejected_logps, ref.chosen_logps, ref.rejected_logps,
                   ref.chosen_len, ref.rejected_len,
                   chosen_wpo_logps=wpo[:b] if wpo is not None else None,
                   rejected_wpo_logps=wpo[b:] if wpo is not None else None,
                   policy_chosen_plain_logps=policy.chosen_plain_logps,
                   router_aux_loss=policy.router_aux_loss)


# The loss options that `spec_from_options` turns into the spec's loss list and weights; every
# other loss option is a field of the spec as given (its meaning is in `options.LossOpts`):
# beta, label_smoothing, ipo_length_normalized (True: TRL's per-token IPO), discopop_tau,
# f_divergence, f_alpha, use_weighting (WPO: every per-pair loss times the pair's `wpo_weights`),
# ld_alpha (how the policy's and the reference's sums are formed, logprobs.sequence_logps and
# scoring.cached_reference; not used by the loss itself) and router_aux_loss_coef (None: the
# model config's, until `logprobs.router_aux_coefficient` resolves it; unresolved, it adds nothing).
SPEC_FROM = ("loss", "loss_weights", "rpo_alpha")

LossSpec = dataclasses.make_dataclass(
    "LossSpec",
    [("losses", tuple, dataclasses.field(default=("sigmoid",))),
     ("weights", tuple, dataclasses.field(default=(1.0,))),
     *composed_fields(LossOpts, without=SPEC_FROM)],
    frozen=True)
LossSpec.__module__ = __name__
LossSpec.__doc__ = "Which losses to combine and their hyper-parameters; check it once with `validate_spec`."


@dataclass(frozen=True)
class LossOutput:
    """Result of `compute_loss`. All tensors except `loss` and `per_pair_loss` are detached.

    loss: scalar, Σ_k w_k · mean_B(loss_k) (+ coef · router aux loss for MoE); what backward() is called on.
    per_pair_loss: [B], Σ_k w_k · loss_k per pair (its mean equals `loss`).
    chosen_rewards / rejected_rewards: [B], β·Δw and β·Δl (plain log-ratios).
    components: loss name -> batch mean of that loss (scalar), before its loss weight w_k
    (with WPO, after the per-pair WPO weights).
    """

    loss: Tensor
    per_pair_loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    components: dict[str, Tensor]
    aux_loss: Tensor | None = None  # MoE router load-balancing loss (detached), already inside `loss`


# ---- f-divergence score transforms g(u) (Wang et al., arXiv 2309.16240; TRL `f_divergence_type`) ----
# g(u) = f'(e^u) exactly as TRL writes it, constants included: they cancel in s_w - s_l, but not after
# the per-token division of `ipo` and `sigmoid_norm`.

def _alpha_divergence(u: Tensor, alpha: float) -> Tensor:
    """g(u) = (exp((α-1)·u) - 1)/(α-1), i.e. f'(t) = (t^(α-1) - 1)/(α-1); g(u) = u when |α-1| < 1e-6.

    As TRL: the exponent is capped at 11 in fp16 and 80 otherwise (TRL has no fp64 entry and raises
    there; we use 80), exp is taken in at least fp32, and the result is multiplied by 1/(α-1).
    """
    if abs(alpha - 1.0) < 1e-6:  # the limit f'(t) -> log t, TRL's tolerance
        return u
    cap = 11.0 if u.dtype == torch.float16 else 80.0
    t = ((alpha - 1.0) * u).to(torch.promote_types(u.dtype, torch.float32))
    return (torch.exp(torch.clamp(t, max=cap)) - 1.0).to(u.dtype) * (1.0 / (alpha - 1.0))


F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": lambda u, alpha: u,  # standard DPO, f'(t) = log t
    "forward_kl": lambda u, alpha: 1.0 - torch.exp(-u),  # f'(t) = 1 - 1/t
    "js_divergence": lambda u, alpha: math.log(2.0) + F.logsigmoid(u),  # f'(t) = log(2t/(t+1))
    "alpha_divergence": _alpha_divergence,
}

# Losses TRL 1.16 accepts with an f-divergence other than reverse_kl: the f-DPO reparameterisation
# leaves a β·log Z(x) term that cancels only in s_w - s_l. `cdpo` is a function of s_w - s_l too.
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "cdpo", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                                 "discopop", "sft"})
# Losses that read `label_smoothing` (ε); TRL 1.16 ignores ε for every other loss type.
SMOOTHED_LOSSES = frozenset({"cdpo", "robust", "exo_pair", "aot", "aot_unpaired"})


def _logratios(x: LossInputs) -> tuple[Tensor, Tensor]:
    """(Δw, Δl) = (log π(y_w) - log π_ref(y_w), log π(y_l) - log π_ref(y_l)), each [B]."""
    return x.policy_chosen_logps - x.ref_chosen_logps, x.policy_rejected_logps - x.ref_rejected_logps


def _scores(x: LossInputs, spec: LossSpec) -> tuple[Tensor, Tensor]:
    """(s_w, s_l) = (g(Δw), g(Δl)) with g the spec's f-divergence transform."""
    g = F_DIVERGENCES[spec.f_divergence]
    dw, dl = _logratios(x)
    return g(dw, spec.f_alpha), g(dl, spec.f_alpha)


def _lengths(x: LossInputs) -> tuple[Tensor, Tensor]:
    """(|y_w|, |y_l|) in the log-probs' dtype, clamped to >= 1 (TRL clamps the mask sums)."""
    like = x.policy_chosen_logps
    return (x.chosen_len.to(like).clamp(min=1.0), x.rejected_len.to(like).clamp(min=1.0))


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1-ε)·log σ(z) - ε·log σ(-z): logistic loss on z with label smoothing ε (cDPO)."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


# ---- the losses: each returns the [B] per-pair loss ----

def sigmoid(x: LossInputs, spec: LossSpec) -> Tensor:
    """DPO: -log σ(βδ). arXiv 2305.18290. TRL `sigmoid`.

    TRL 1.16 ignores label smoothing here (TRL <= 0.x applied it); smoothed DPO is `cdpo`.
    """
    s_w, s_l = _scores(x, spec)
    return -F.logsigmoid(spec.beta * (s_w - s_l))


def cdpo(x: LossInputs, spec: LossSpec) -> Tensor:
    """Conservative DPO: -(1-ε)·log σ(βδ) - ε·log σ(-βδ). https://ericmitchell.ai/cdpo.pdf.

    Not a TRL 1.16 loss type: it is what TRL <= 0.x computed for `sigmoid` with label_smoothing = ε,
    kept under its own name so that `sigmoid` always means TRL 1.16's `sigmoid`.
    """
    s_w, s_l = _scores(x, spec)
    return _smoothed_logistic(spec.beta * (s_w - s_l), spec.label_smoothing)


def hinge(x: LossInputs, spec: LossSpec) -> Tensor:
    """SLiC / RSO: max(0, 1 - βδ). arXiv 2305.10425, 2309.06657. TRL `hinge`."""
    s_w, s_l = _scores(x, spec)
    return torch.relu(1.0 - spec.beta * (s_w - s_l))


def ipo(x: LossInputs, spec: LossSpec) -> Tensor:
    """IPO: (s_w/|y_w| - s_l/|y_l| - 1/(2β))². arXiv 2310.12036 Eq. 17, with τ = β. TRL `ipo`.

    `ipo_length_normalized=True` is TRL's per-token-averaged form; False uses the sums
    (s_w - s_l), as the paper, OpenRLHF and the original DPO repository do.
    """
    s_w, s_l = _scores(x, spec)
    if spec.ipo_length_normalized:
        len_w, len_l = _lengths(x)
        s_w, s_l = s_w / len_w, s_l / len_l
    return (s_w - s_l - 1.0 / (2.0 * spec.beta)) ** 2


def exo_pair(x: LossInputs, spec: LossSpec) -> Tensor:
    """EXO: σ(βδ)·(log σ(βδ) - log(1-ε)) + σ(-βδ)·(log σ(-βδ) - log ε). TRL `exo_pair`.

    arXiv 2402.00856 Eq. 16. ε must be > 0 (log ε); `validate_spec` refuses 0, as TRL raises.
    """
    s_w, s_l = _scores(x, spec)
    z, eps = spec.beta * (s_w - s_l), spec.label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair(x: LossInputs, spec: LossSpec) -> Tensor:
    """NCA: -log σ(β·Δw) - ½·log σ(-β·Δw) - ½·log σ(-β·Δl). arXiv 2402.05369. TRL `nca_pair`.

    Plain log-ratios: TRL refuses an f-divergence with this loss (so does `validate_spec`).
    """
    dw, dl = _logratios(x)
    b = spec.beta
    return -F.logsigmoid(b * dw) - 0.5 * F.logsigmoid(-b * dw) - 0.5 * F.logsigmoid(-b * dl)


def robust(x: LossInputs, spec: LossSpec) -> Tensor:
    """rDPO: [-(1-ε)·log σ(βδ) + ε·log σ(-βδ)] / (1-2ε), ε in [0, 0.5). arXiv 2403.00409. TRL `robust`."""
    s_w, s_l = _scores(x, spec)
    z, eps = spec.beta * (s_w - s_l), spec.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair(x: LossInputs, spec: LossSpec) -> Tensor:
    """BCO, paired: -log σ(β·Δw) - log σ(-β·Δl). arXiv 2404.04656. TRL `bco_pair`.

    No running-mean reward baseline (TRL's DPO has none; LLaMA-Factory's BCO does). Plain
    log-ratios: no f-divergence (as TRL).
    """
    dw, dl = _logratios(x)
    return -F.logsigmoid(spec.beta * dw) - F.logsigmoid(-spec.beta * dl)


def sppo_hard(x: LossInputs, spec: LossSpec) -> Tensor:
    """SPPO (hard labels): (Δw - 1/(2β))² + (Δl + 1/(2β))², plain log-ratios (no f-divergence, as TRL).

    arXiv 2405.00675. TRL `sppo_hard`.
    """
    dw, dl = _logratios(x)
    half = 0.5 / spec.beta
    return (dw - half) ** 2 + (dl + half) ** 2


def aot(x: LossInputs, spec: LossSpec) -> Tensor:
    """AOT (paired): d = sort_B(c - r) - sort_B(c_ref - r_ref), loss -(1-ε)·log σ(βd) - ε·log σ(-βd).

    arXiv 2406.05882. TRL `aot`. Sorting is over the batch, so entry i belongs to the i-th quantile,
    not to pair i (the batch mean is what matters). Uses plain log-probs, no f-divergence (as TRL).
    """
    a = torch.sort(x.policy_chosen_logps - x.policy_rejected_logps, dim=0).values
    b = torch.sort(x.ref_chosen_logps - x.ref_rejected_logps, dim=0).values
    return _smoothed_logistic(spec.beta * (a - b), spec.label_smoothing)


def aot_unpaired(x: LossInputs, spec: LossSpec) -> Tensor:
    """AOT (unpaired): d = sort_B(Δw) - sort_B(Δl), then as `aot`. arXiv 2406.05882. TRL `aot_unpaired`."""
    dw, dl = _logratios(x)
    d = torch.sort(dw, dim=0).values - torch.sort(dl, dim=0).values
    return _smoothed_logistic(spec.beta * d, spec.label_smoothing)


def apo_zero(x: LossInputs, spec: LossSpec) -> Tensor:
    """APO-zero: (1 - σ(β·Δw)) + σ(β·Δl), plain log-ratios. arXiv 2408.06266. TRL `apo_zero`."""
    dw, dl = _logratios(x)
    return (1.0 - torch.sigmoid(spec.beta * dw)) + torch.sigmoid(spec.beta * dl)


def apo_down(x: LossInputs, spec: LossSpec) -> Tensor:
    """APO-down: σ(β·Δw) + (1 - σ(β·(Δw - Δl))), plain log-ratios. arXiv 2408.06266. TRL `apo_down`."""
    dw, dl = _logratios(x)
    return torch.sigmoid(spec.beta * dw) + (1.0 - torch.sigmoid(spec.beta * (dw - dl)))


def discopop(x: LossInputs, spec: LossSpec) -> Tensor:
    """DiscoPOP: z = βδ, m = σ(z/τ), loss (1-m)·(-log σ(z)) + m·exp(-z). arXiv 2406.08414. TRL `discopop`.

    TRL writes m·exp(-z) literally, which is inf·0 = NaN for z << 0; we compute the same product as
    exp(log σ(z/τ) - z) and 1-m as σ(-z/τ), so large margins stay finite (for τ < 1).
    """
    s_w, s_l = _scores(x, spec)
    z, tau = spec.beta * (s_w - s_l), spec.discopop_tau
    return torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)


def sigmoid_norm(x: LossInputs, spec: LossSpec) -> Tensor:
    """Length-normalised DPO (SimPO's normalisation, reference kept): -log σ(β·(s_w/|y_w| - s_l/|y_l|)).

    arXiv 2405.14734 (SimPO). TRL `sigmoid_norm`. Label smoothing does not apply (as TRL).
    """
    s_w, s_l = _scores(x, spec)
    len_w, len_l = _lengths(x)
    return -F.logsigmoid(spec.beta * (s_w / len_w - s_l / len_l))


def sft(x: LossInputs, spec: LossSpec) -> Tensor:
    """Token-mean NLL of the chosen completions over the batch, -Σ log π(y_w) / Σ|y_w|, broadcast to [B].

    Mixed with a DPO loss by weights this is RPO (arXiv 2404.19733). TRL `sft`.
    """
    chosen = x.policy_chosen_plain_logps if x.policy_chosen_plain_logps is not None else x.policy_chosen_logps
    nll = -chosen.sum() / x.chosen_len.to(chosen).sum().clamp(min=1.0)
    return nll.expand_as(x.policy_chosen_logps)


def wpo_weights(x: LossInputs) -> Tensor:
    """WPO's per-pair weight w_w·w_l, with w = exp(mean over the completion's tokens of
    log p(y_t) - log Σ_v p_v²): the sequence's probability under the policy's own sampling
    distribution, per token. arXiv 2406.11827 Eq. 2. TRL `use_weighting` (no gradient, as TRL).
    """
    if x.chosen_wpo_logps is None or x.rejected_wpo_logps is None:
        raise ValueError("use_weighting needs the policy's per-token WPO terms "
                         "(sequence_logps(..., token_stats=True))")
    len_w, len_l = _lengths(x)
    w_w = torch.exp(x.chosen_wpo_logps.to(len_w) / len_w)
    w_l = torch.exp(x.rejected_wpo_logps.to(len_l) / len_l)
    return (w_w * w_l).detach()


LOSSES: dict[str, Callable[[LossInputs, LossSpec], Tensor]] = {
    "sigmoid": sigmoid, "cdpo": cdpo, "hinge": hinge, "ipo": ipo, "exo_pair": exo_pair, "nca_pair": nca_pair,
    "robust": robust, "bco_pair": bco_pair, "sppo_hard": sppo_hard, "aot": aot,
    "aot_unpaired": aot_unpaired, "apo_zero": apo_zero, "apo_down": apo_down,
    "discopop": discopop, "sigmoid_norm": sigmoid_norm, "sft": sft,
}


def _suggest(name: str, options) -> str | None:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"did you mean '{close[0]}'?" if close else None


def validate_spec(spec: LossSpec) -> None:
    """Raise a one-line `DpocliError` naming the field if `spec` cannot be computed."""
    if not spec.losses:
        raise DpocliError("is empty (expected at least one loss type)", field="losses")
    for name in spec.losses:
        if name not in LOSSES:
            raise DpocliError(f"has unknown loss type '{name}' (known: {', '.join(LOSSES)})",
                              field="losses", hint=_suggest(name, LOSSES))
    if len(set(spec.losses)) != len(spec.losses):
        raise DpocliError(f"lists a loss type twice: {','.join(spec.losses)}", field="losses")
    if len(spec.weights) != len(spec.losses):
        raise DpocliError(f"has {len(spec.weights)} values for {len(spec.losses)} losses "
                          f"({','.join(spec.losses)}); give one weight per loss", field="weights")
    if not all(math.isfinite(w) for w in spec.weights):
        raise DpocliError(f"must be finite numbers, got {spec.weights}", field="weights")
    if not (math.isfinite(spec.beta) and spec.beta > 0):
        raise DpocliError(f"must be > 0, got {spec.beta}", field="beta")
    if spec.f_divergence not in F_DIVERGENCES:
        raise DpocliError(f"has unknown value '{spec.f_divergence}' (known: {', '.join(F_DIVERGENCES)})",
                          field="f_divergence", hint=_suggest(spec.f_divergence, F_DIVERGENCES))
    unsupported = [name for name in spec.losses if name not in F_DIVERGENCE_LOSSES]
    if spec.f_divergence != "reverse_kl" and unsupported:
        raise DpocliError(f"'{spec.f_divergence}' does not apply to loss {', '.join(unsupported)} "
                          f"(as in TRL, only {', '.join(sorted(F_DIVERGENCE_LOSSES))} take an f-divergence)",
                          field="f_divergence", hint="use --f-divergence reverse_kl with these losses")
    _validate_label_smoothing(spec)  # after the f-divergence check, the order of TRL's own checks
    if not math.isfinite(spec.f_alpha):
        raise DpocliError(f"must be a finite number, got {spec.f_alpha}", field="f_alpha")
    if not (math.isfinite(spec.discopop_tau) and spec.discopop_tau > 0):
        raise DpocliError(f"must be > 0, got {spec.discopop_tau}", field="discopop_tau")
    sorting = sorted({"aot", "aot_unpaired"}.intersection(spec.losses))
    if spec.use_weighting and sorting:  # TRL raises NotImplementedError
        raise DpocliError(f"does not apply to loss {', '.join(sorting)}: it sorts pairs, so per-pair "
                          "weights would be misaligned (TRL refuses it too)", field="use_weighting")


def _validate_label_smoothing(spec: LossSpec) -> None:
    """ε in [0, 0.5] ([0, 0.5) for robust, > 0 for exo_pair), and only where some listed loss uses it."""
    eps = spec.label_smoothing
    if "robust" in spec.losses and not 0.0 <= eps < 0.5:
        raise DpocliError(f"must be in [0, 0.5) for robust, got {eps}", field="label_smoothing")
    if not 0.0 <= eps <= 0.5:
        raise DpocliError(f"must be in [0, 0.5], got {eps}", field="label_smoothing")
    if "exo_pair" in spec.losses and eps == 0.0:  # log ε = -inf; TRL raises too
        raise DpocliError("must be > 0 for exo_pair", field="label_smoothing",
                          hint="the EXO paper recommends --label-smoothing 1e-3")
    if eps > 0.0 and not SMOOTHED_LOSSES.intersection(spec.losses):
        # TRL 1.16 would train without it; a flag that silently does nothing is refused instead.
        raise DpocliError(f"{eps} has no effect on loss {','.join(spec.losses)} (TRL 1.16 ignores it; only "
                          f"{', '.join(sorted(SMOOTHED_LOSSES))} use it)", field="label_smoothing",
                          hint="for label-smoothed DPO use --loss cdpo, or drop --label-smoothing")


def compute_loss(inputs: LossInputs, spec: LossSpec) -> LossOutput:
    """Weighted sum of the spec's losses, plus implicit rewards (β·Δw, β·Δl) and per-loss batch means."""
    validate_spec(spec)  # a few comparisons; cheap next to the forward pass that produced `inputs`
    per_pair = torch.zeros_like(inputs.policy_chosen_logps)
    components = {}
    pair_weights = wpo_weights(inputs) if spec.use_weighting else None
    for name, weight in zip(spec.losses, spec.weights):
        loss_k = LOSSES[name](inputs, spec)
        if pair_weights is not None:  # TRL weights every loss type's per-pair value, sft included
            loss_k = loss_k * pair_weights
        components[name] = loss_k.detach().mean()
        per_pair = per_pair + weight * loss_k
    dw, dl = _logratios(inputs)
    loss, aux = per_pair.mean(), None
    if spec.router_aux_loss_coef and inputs.router_aux_loss is not None:  # TRL: loss + coef·aux_loss
        aux = inputs.router_aux_loss
        loss = loss + spec.router_aux_loss_coef * aux.to(loss.dtype)
    return LossOutput(loss=loss, per_pair_loss=per_pair,
                      chosen_rewards=(spec.beta * dw).detach(), rejected_rewards=(spec.beta * dl).detach(),
                      components=components, aux_loss=aux.detach() if aux is not None else None)
