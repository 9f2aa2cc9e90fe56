"""Tests for dpocli.objective.losses against an independent re-implementation written here with `math`.

The reference below (`expected`) is a second implementation of TRL 1.16's `_compute_loss` formulas
(and of `cdpo`, TRL <= 0.x's smoothed sigmoid), element by element in plain Python floats; it never
calls dpocli.objective.losses. `trl_accepts` restates, independently, which options TRL 1.16 refuses or ignores.
tests/test_losses_trl.py compares against values recorded from TRL itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpocli.errors import DpocliError
from dpocli.objective.losses import (
    LOSSES,
    LossInputs,
    LossOutput,
    LossSpec,
    compute_loss,
    validate_spec,
)
from dpocli.objective.spec import parse_loss_list

ALL_LOSSES = [
    "sigmoid", "cdpo", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
]

# Hand-picked batch (B = 4) with differing lengths and no ties in any sorted quantity:
#   Δw = PC - RC = [ 0.7,  1.4,  0.9, -0.9]      Δl = PR - RR = [-1.1, -0.8, 0.7, -1.4]
#   PC - PR      = [ 2.9, -1.4,  2.6,  6.4]      RC - RR      = [ 1.1, -3.6, 2.4,  5.9]
PC = [-12.3, -40.1, -7.3, -25.0]
PR = [-15.2, -38.7, -9.9, -31.4]
RC = [-13.0, -41.5, -8.2, -24.1]
RR = [-14.1, -37.9, -10.6, -30.0]
CL = [5, 17, 3, 11]
RL = [7, 14, 3, 20]


# ---------------------------------------------------------------- independent reference (plain math)

def lsig(x: float) -> float:
    """log σ(x), stable for either sign."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def g(u: float, fdiv: str, alpha: float) -> float:
    """f'(e^u) as TRL 1.16 writes each score, constants kept."""
    if fdiv == "reverse_kl" or (fdiv == "alpha_divergence" and alpha == 1.0):
        return u
    if fdiv == "forward_kl":
        return 1.0 - math.exp(-u)
    if fdiv == "js_divergence":
        return math.log(2.0) + lsig(u)
    if fdiv == "alpha_divergence":
        return (math.exp(min((alpha - 1.0) * u, 80.0)) - 1.0) / (alpha - 1.0)
    raise AssertionError(fdiv)


# TRL 1.16's constructor refuses an f-divergence other than reverse_kl outside this set (cdpo is
# dpocli's, a function of s_w - s_l like sigmoid).
F_DIV_LOSSES = {"sigmoid", "cdpo", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
# The losses whose TRL formula reads label_smoothing (plus cdpo); TRL ignores ε for all others.
EPS_LOSSES = {"cdpo", "robust", "exo_pair", "aot", "aot_unpaired"}


def trl_accepts(names: tuple[str, ...], fdiv: str, eps: float) -> str | None:
    """None if dpocli must compute this spec, else the field its refusal must name (TRL's order)."""
    if fdiv != "reverse_kl" and not set(names) <= F_DIV_LOSSES:
        return "f_divergence"  # TRL raises
    if "exo_pair" in names and eps == 0.0:
        return "label_smoothing"  # TRL raises: log ε
    if eps > 0.0 and not EPS_LOSSES & set(names):
        return "label_smoothing"  # TRL would ignore ε; dpocli refuses a flag that does nothing
    return None


def expected(name, pc=PC, pr=PR, rc=RC, rr=RR, cl=CL, rl=RL, beta=0.1, eps=0.0,
             fdiv="reverse_kl", alpha=1.0, tau=0.05, ipo_norm=True) -> list[float]:
    """Per-pair loss list for loss `name`, straight from the formula tables."""
    b = beta
    dw = [c - r for c, r in zip(pc, rc)]
    dl = [c - r for c, r in zip(pr, rr)]
    sw = [g(u, fdiv, alpha) for u in dw]
    sl = [g(u, fdiv, alpha) for u in dl]
    d = [w - l for w, l in zip(sw, sl)]
    n = len(pc)
    out = []
    if name == "aot":
        a = sorted(c - r for c, r in zip(pc, pr))
        r_ = sorted(c - r for c, r in zip(rc, rr))
        return [-(1 - eps) * lsig(b * (x - y)) - eps * lsig(-b * (x - y)) for x, y in zip(a, r_)]
    if name == "aot_unpaired":
        a, r_ = sorted(dw), sorted(dl)
        return [-(1 - eps) * lsig(b * (x - y)) - eps * lsig(-b * (x - y)) for x, y in zip(a, r_)]
    if name == "sft":
        return [-sum(pc) / sum(cl)] * n
    for i in range(n):
        z = b * d[i]
        if name == "sigmoid":
            v = -lsig(z)
        elif name == "cdpo":
            v = -(1 - eps) * lsig(z) - eps * lsig(-z)
        elif name == "hinge":
            v = max(0.0, 1.0 - z)
        elif name == "ipo":
            h = sw[i] / cl[i] - sl[i] / rl[i] if ipo_norm else d[i]
            v = (h - 1.0 / (2.0 * b)) ** 2
        elif name == "exo_pair":
            v = sig(z) * (lsig(z) - math.log(1 - eps)) + sig(-z) * (lsig(-z) - math.log(eps))
        elif name == "nca_pair":  # TRL: plain log-ratios (an f-divergence is refused)
            v = -lsig(b * dw[i]) - 0.5 * lsig(-b * dw[i]) - 0.5 * lsig(-b * dl[i])
        elif name == "robust":
            v = (-(1 - eps) * lsig(z) + eps * lsig(-z)) / (1 - 2 * eps)
        elif name == "bco_pair":
            v = -lsig(b * dw[i]) - lsig(-b * dl[i])
        elif name == "sppo_hard":
            v = (dw[i] - 1 / (2 * b)) ** 2 + (dl[i] + 1 / (2 * b)) ** 2
        elif name == "apo_zero":
            v = (1 - sig(b * dw[i])) + sig(b * dl[i])
        elif name == "apo_down":
            v = sig(b * dw[i]) + (1 - sig(b * (dw[i] - dl[i])))
        elif name == "discopop":
            m = sig(z / tau)
            v = (1 - m) * (-lsig(z)) + m * math.exp(-z)
        elif name == "sigmoid_norm":
            v = -lsig(b * (sw[i] / cl[i] - sl[i] / rl[i]))
        else:
            raise AssertionError(name)
        out.append(v)
    return out


# ---------------------------------------------------------------- helpers

def make_inputs(pc=PC, pr=PR, rc=RC, rr=RR, cl=CL, rl=RL, dtype=torch.float64, grad=False) -> LossInputs:
    t = lambda v: torch.tensor(v, dtype=dtype, requires_grad=grad)  # noqa: E731
    return LossInputs(t(pc), t(pr), torch.tensor(rc, dtype=dtype), torch.tensor(rr, dtype=dtype),
                      torch.tensor(cl, dtype=torch.long), torch.tensor(rl, dtype=torch.long))


def assert_close(got: torch.Tensor, want: list[float], rel=1e-10, abs_=1e-10):
    got_list = got.detach().tolist()
    assert len(got_list) == len(want)
    for gv, wv in zip(got_list, want):
        assert math.isclose(gv, wv, rel_tol=rel, abs_tol=abs_), (got_list, want)


def test_registry_lists_every_loss_type():
    assert sorted(LOSSES) == sorted(ALL_LOSSES)


# ---------------------------------------------------------------- values vs the reference

# (beta, eps): the default, a mid value with smoothing, and the small / large beta edges.
SETTINGS = [(0.1, 0.0), (0.5, 0.2), (1e-3, 0.1), (10.0, 0.3)]
# (f_divergence, α): α = 0.5 is the default; 1.0 is the reverse_kl fallback; α < 0 flips the sign.
F_DIVS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
          ("alpha_divergence", 1.5), ("alpha_divergence", 1.0), ("alpha_divergence", -0.5)]


@pytest.mark.parametrize("beta,eps", SETTINGS)
@pytest.mark.parametrize("fdiv,alpha", F_DIVS)
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_combination_matches_trl_formula_or_is_refused(name, fdiv, alpha, beta, eps):
    spec = LossSpec(losses=(name,), beta=beta, label_smoothing=eps, f_divergence=fdiv, f_alpha=alpha)
    refused = trl_accepts((name,), fdiv, eps)
    if refused:
        assert _error(**vars(spec)).field == refused
        return
    got = compute_loss(make_inputs(), spec).per_pair_loss
    assert got.shape == (4,) and got.dtype == torch.float64
    assert_close(got, expected(name, beta=beta, eps=eps, fdiv=fdiv, alpha=alpha))


def test_f_divergence_constants_survive_ipo_length_normalisation():
    """Δw = Δl = u, |y_w| = 1, |y_l| = 3, β = 0.5: h = s(1 - 1/3) = 2s/3, loss (2s/3 - 1)².

    Dropping g's constant (as dpocli once did) leaves δ unchanged but changes s, hence h:
      forward_kl, u = ln 2:    s = 1 - 1/2 = 1/2                  -> (1/3 - 1)² = 4/9
      js_divergence, u = ln 3: s = ln 2 + ln σ(ln 3) = ln(3/2)    -> (2/3·ln 1.5 - 1)²
      alpha_divergence α = 0.5, u = -2 ln 2: s = (2 - 1)/(-1/2) = -2 -> (-4/3 - 1)² = 49/9
    """
    cases = [("forward_kl", 0.5, math.log(2), 4 / 9),
             ("js_divergence", 0.5, math.log(3), (2 / 3 * math.log(1.5) - 1) ** 2),
             ("alpha_divergence", 0.5, -2 * math.log(2), 49 / 9)]
    for fdiv, alpha, u, want in cases:
        x = make_inputs(pc=[u], pr=[u], rc=[0.0], rr=[0.0], cl=[1], rl=[3])
        got = LOSSES["ipo"](x, LossSpec(losses=("ipo",), beta=0.5, f_divergence=fdiv, f_alpha=alpha))
        assert math.isclose(got.item(), want, rel_tol=1e-12), (fdiv, got.item(), want)


def test_alpha_divergence_default_and_fallback():
    assert LossSpec().f_alpha == 0.5  # TRL's f_alpha_divergence_coef default
    x = make_inputs()
    plain = LOSSES["sigmoid"](x, LossSpec())
    near_one = LossSpec(f_divergence="alpha_divergence", f_alpha=1.0 + 5e-7)  # TRL: |α - 1| < 1e-6
    assert torch.equal(LOSSES["sigmoid"](x, near_one), plain)


def test_alpha_divergence_exponent_cap():
    # α = 4, Δw = 40: (α-1)·Δw = 120 is capped at 80, so s_w = (e^80 - 1)/3 (TRL caps before exp).
    x = make_inputs(pc=[40.0], pr=[0.0], rc=[0.0], rr=[0.0], cl=[1], rl=[1])
    spec = LossSpec(losses=("hinge",), beta=1e-36, f_divergence="alpha_divergence", f_alpha=4.0)
    got = LOSSES["hinge"](x, spec).item()  # 1 - β·(s_w - 0)
    assert math.isclose(got, 1.0 - 1e-36 * (math.exp(80) - 1) / 3, rel_tol=1e-12)


def test_ipo_summed_form_and_length_normalised_form():
    # Summed (paper / OpenRLHF): h = δ. Pair 0: δ = 0.7 - (-1.1) = 1.8; β = 0.5 -> (1.8 - 1)² = 0.64.
    summed = LOSSES["ipo"](make_inputs(), LossSpec(losses=("ipo",), beta=0.5, ipo_length_normalized=False))
    assert math.isclose(summed[0].item(), 0.64, rel_tol=1e-12)
    assert_close(summed, expected("ipo", beta=0.5, ipo_norm=False))
    # TRL form, pair 0: h = 0.7/5 - (-1.1)/7 = 0.14 + 0.157142857...; (h - 1)².
    normed = LOSSES["ipo"](make_inputs(), LossSpec(losses=("ipo",), beta=0.5))
    assert math.isclose(normed[0].item(), (0.14 + 1.1 / 7 - 1.0) ** 2, rel_tol=1e-12)


def test_sigmoid_hand_arithmetic():
    """Δw = 2, Δl = -2, β = 0.5 -> βδ = 2 -> loss = log(1 + e^-2) = 0.1269280110429725."""
    x = make_inputs(pc=[2.0], pr=[-2.0], rc=[0.0], rr=[0.0], cl=[1], rl=[1])
    out = compute_loss(x, LossSpec(beta=0.5))
    assert math.isclose(out.loss.item(), 0.1269280110429725, rel_tol=1e-14)
    assert out.chosen_rewards.tolist() == [1.0] and out.rejected_rewards.tolist() == [-1.0]


def test_sigmoid_ignores_eps_and_cdpo_applies_it():
    """TRL 1.16's sigmoid has no ε; cdpo is -(1-ε)·log σ(βδ) - ε·log σ(-βδ), and plain DPO at ε = 0."""
    x = make_inputs()
    deltas = [w - l for w, l in zip([0.7, 1.4, 0.9, -0.9], [-1.1, -0.8, 0.7, -1.4])]
    plain = [-lsig(0.1 * d) for d in deltas]
    assert_close(LOSSES["sigmoid"](x, LossSpec(label_smoothing=0.25)), plain)
    assert_close(LOSSES["cdpo"](x, LossSpec(losses=("cdpo",), label_smoothing=0.0)), plain)
    smoothed = [-0.75 * lsig(0.1 * d) - 0.25 * lsig(-0.1 * d) for d in deltas]
    assert_close(LOSSES["cdpo"](x, LossSpec(losses=("cdpo",), label_smoothing=0.25)), smoothed)


@pytest.mark.parametrize("losses", [("sigmoid",), ("hinge",), ("ipo",), ("sigmoid", "sft"), ("discopop",)])
def test_label_smoothing_that_no_loss_uses_is_refused(losses):
    err = _error(losses=losses, weights=(1.0,) * len(losses), label_smoothing=0.1)
    assert err.field == "label_smoothing" and "no effect" in str(err) and "cdpo" in err.hint
    # ...but accepted where one listed loss uses it, as TRL applies it there only.
    validate_spec(LossSpec(losses=(*losses, "robust"), weights=(1.0,) * (len(losses) + 1),
                           label_smoothing=0.1))


def test_exo_pair_refuses_eps_zero():
    err = _error(losses=("exo_pair",), label_smoothing=0.0)
    assert err.field == "label_smoothing" and "exo_pair" in str(err) and "1e-3" in err.hint
    validate_spec(LossSpec(losses=("exo_pair",), label_smoothing=1e-3))


@pytest.mark.parametrize("name", ["nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                                  "apo_down"])
def test_f_divergence_refused_where_trl_refuses_it(name):
    err = _error(losses=(name,), f_divergence="js_divergence")
    assert err.field == "f_divergence" and name in str(err)
    # In a combination too, even when the other loss would take it.
    err = _error(losses=("sigmoid", name), weights=(1.0, 1.0), f_divergence="forward_kl")
    assert err.field == "f_divergence"


@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_discopop_tau(tau):
    got = LOSSES["discopop"](make_inputs(), LossSpec(losses=("discopop",), beta=0.7, discopop_tau=tau))
    assert_close(got, expected("discopop", beta=0.7, tau=tau))


def test_sft_is_token_mean_over_batch():
    # -(−12.3 − 40.1 − 7.3 − 25.0) / (5 + 17 + 3 + 11) = 84.7 / 36
    got = LOSSES["sft"](make_inputs(), LossSpec(losses=("sft",)))
    assert_close(got, [84.7 / 36] * 4, rel=1e-13)


def test_float32_in_float32_out():
    out = compute_loss(make_inputs(dtype=torch.float32), LossSpec(losses=("sigmoid", "ipo", "sft"),
                                                                  weights=(1.0, 1.0, 1.0)))
    assert out.loss.dtype == torch.float32 and out.per_pair_loss.dtype == torch.float32
    assert out.chosen_rewards.dtype == torch.float32


# ---------------------------------------------------------------- large margins, small / large beta

def _extreme(sign: float, dtype):
    """δ = sign·1e4 (Δw = sign·5e3, Δl = -sign·5e3), lengths 1; PC - PR = sign·1e4, reference 0."""
    return make_inputs(pc=[sign * 5e3], pr=[-sign * 5e3], rc=[0.0], rr=[0.0], cl=[1], rl=[1],
                       dtype=dtype, grad=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_large_margin_is_finite_with_finite_gradients(name, sign, dtype):
    x = _extreme(sign, dtype)
    loss = LOSSES[name](x, LossSpec(losses=(name,), beta=0.1, label_smoothing=0.2))
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    for grad in (x.policy_chosen_logps.grad, x.policy_rejected_logps.grad):
        assert grad is None or torch.isfinite(grad).all()  # None: sft ignores the rejected side


# β = 0.1, |δ| = 1e4 -> z = ±1000. Asymptotes derived by hand (ε = 0.2 where used):
ASYMPTOTES = {
    # name: (value at z = +1000, value at z = -1000)
    "sigmoid_eps0": (0.0, 1000.0),                 # -log σ(z): 0 and |z| = β·|δ|
    "hinge": (0.0, 1001.0),                        # max(0, 1 - z)
    "cdpo": (0.2 * 1000, 0.8 * 1000),              # -(1-ε)·log σ(z) - ε·log σ(-z)
    "robust": (-0.2 * 1000 / 0.6, 0.8 * 1000 / 0.6),
    "exo_pair": (-math.log(0.8), -math.log(0.2)),
    "discopop": (0.0, 1000.0),
    "nca_pair": (0.0 + 250.0, 500.0 + 250.0),      # β·s_w = ±500, β·s_l = ∓500
    "bco_pair": (0.0, 1000.0),
    "apo_zero": (0.0, 2.0),
    "apo_down": (1.0, 1.0),
    "sigmoid_norm": (0.0, 1000.0),                 # lengths 1
}


@pytest.mark.parametrize("key", sorted(ASYMPTOTES))
def test_large_margin_asymptotes(key):
    name = key.removesuffix("_eps0")
    eps = 0.0 if key.endswith("_eps0") else 0.2
    for sign, want in zip([1.0, -1.0], ASYMPTOTES[key]):
        got = LOSSES[name](_extreme(sign, torch.float64), LossSpec(losses=(name,), label_smoothing=eps))
        assert math.isclose(got.item(), want, rel_tol=1e-12, abs_tol=1e-12), (key, sign, got.item())


def test_discopop_does_not_nan_where_the_literal_formula_would():
    # TRL's literal m·exp(-z) is inf·0 = NaN at z = -1000; the stable form gives 1000.
    got = LOSSES["discopop"](_extreme(-1.0, torch.float32), LossSpec(losses=("discopop",)))
    assert math.isclose(got.item(), 1000.0, rel_tol=1e-6)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("fdiv,alpha", [("reverse_kl", 1.0), ("js_divergence", 1.0), ("alpha_divergence", 0.5)])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradcheck(name, fdiv, alpha):
    # Inputs have no ties (aot sorts stay differentiable) and no hinge kink (1 - βδ ≠ 0).
    spec = LossSpec(losses=(name,), beta=0.5, label_smoothing=0.1, f_divergence=fdiv, f_alpha=alpha)
    base = make_inputs()

    def fn(pc, pr):
        x = LossInputs(pc, pr, base.ref_chosen_logps, base.ref_rejected_logps, base.chosen_len, base.rejected_len)
        return LOSSES[name](x, spec)

    pc = base.policy_chosen_logps.clone().requires_grad_(True)
    pr = base.policy_rejected_logps.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (pc, pr), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_compute_loss_combination():
    spec = LossSpec(losses=("sigmoid", "sft", "ipo"), weights=(1.0, 0.5, 0.25), beta=0.3)
    base = make_inputs()

    def fn(pc, pr):
        x = LossInputs(pc, pr, base.ref_chosen_logps, base.ref_rejected_logps, base.chosen_len, base.rejected_len)
        return compute_loss(x, spec).loss

    pc = base.policy_chosen_logps.clone().requires_grad_(True)
    pr = base.policy_rejected_logps.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (pc, pr), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_sigmoid_gradient_closed_form():
    # d/dc [-log σ(β(Δw - Δl))] = -β·σ(-βδ); d/dr = +β·σ(-βδ).
    x = make_inputs(grad=True)
    LOSSES["sigmoid"](x, LossSpec()).sum().backward()
    deltas = [0.7 + 1.1, 1.4 + 0.8, 0.9 - 0.7, -0.9 + 1.4]
    assert_close(x.policy_chosen_logps.grad, [-0.1 * sig(-0.1 * d) for d in deltas], rel=1e-12)
    assert_close(x.policy_rejected_logps.grad, [0.1 * sig(-0.1 * d) for d in deltas], rel=1e-12)


# ---------------------------------------------------------------- policy == reference

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-7)])
def test_policy_equals_reference_gives_ln2_and_zero_rewards(dtype, tol):
    x = make_inputs(pc=PC, pr=PR, rc=PC, rr=PR, dtype=dtype)
    out = compute_loss(x, LossSpec())
    assert abs(out.loss.item() - math.log(2)) <= tol
    assert all(abs(v - math.log(2)) <= tol for v in out.per_pair_loss.tolist())
    assert out.chosen_rewards.tolist() == [0.0] * 4 and out.rejected_rewards.tolist() == [0.0] * 4
    accuracy = (out.chosen_rewards > out.rejected_rewards).to(dtype).mean().item()
    assert accuracy == 0.0
    # The length-normalised variant is ln 2 too (δ = 0 whatever the lengths).
    norm = compute_loss(x, LossSpec(losses=("sigmoid_norm",)))
    assert abs(norm.loss.item() - math.log(2)) <= tol


# ---------------------------------------------------------------- combination and output record

def test_sigmoid_plus_sft_combination():
    names, weights = parse_loss_list("sigmoid,sft", "1,0.5")
    assert names == ("sigmoid", "sft") and weights == (1.0, 0.5)
    out = compute_loss(make_inputs(), LossSpec(losses=names, weights=weights))
    assert isinstance(out, LossOutput)
    sig_mean = sum(expected("sigmoid")) / 4
    sft_val = 84.7 / 36
    assert math.isclose(out.loss.item(), 1.0 * sig_mean + 0.5 * sft_val, rel_tol=1e-12)
    assert math.isclose(out.per_pair_loss.mean().item(), out.loss.item(), rel_tol=1e-15)
    assert_close(out.per_pair_loss, [v + 0.5 * sft_val for v in expected("sigmoid")], rel=1e-12)
    assert set(out.components) == {"sigmoid", "sft"}
    assert math.isclose(out.components["sigmoid"].item(), sig_mean, rel_tol=1e-12)
    assert math.isclose(out.components["sft"].item(), sft_val, rel_tol=1e-12)
    assert not out.components["sigmoid"].requires_grad


def test_rewards_use_plain_log_ratios_under_f_divergence():
    x = make_inputs(grad=True)
    out = compute_loss(x, LossSpec(losses=("sigmoid",), beta=0.2, f_divergence="js_divergence"))
    assert_close(out.chosen_rewards, [0.2 * v for v in [0.7, 1.4, 0.9, -0.9]], rel=1e-12)
    assert_close(out.rejected_rewards, [0.2 * v for v in [-1.1, -0.8, 0.7, -1.4]], rel=1e-12)
    assert not out.chosen_rewards.requires_grad and out.loss.requires_grad
    assert out.loss.shape == ()


# ---------------------------------------------------------------- validation and parsing

def _error(**kw) -> DpocliError:
    with pytest.raises(DpocliError) as info:
        validate_spec(LossSpec(**kw))
    assert "\n" not in str(info.value)
    return info.value


def test_unknown_loss_suggests_close_match():
    err = _error(losses=("sigmod",))
    assert err.field == "losses" and "sigmod" in str(err)
    assert "sigmoid" in (err.hint or "")
    with pytest.raises(DpocliError):  # compute_loss validates too
        compute_loss(make_inputs(), LossSpec(losses=("sigmod",)))


def test_weights_mismatch():
    err = _error(losses=("sigmoid", "sft"), weights=(1.0,))
    assert err.field == "weights"


@pytest.mark.parametrize("losses,eps,ok", [
    (("cdpo",), 0.5, True), (("sigmoid",), 0.0, True), (("cdpo",), 0.51, False),
    (("cdpo",), -0.1, False), (("robust",), 0.49, True), (("robust",), 0.5, False),
])
def test_label_smoothing_range(losses, eps, ok):
    spec = LossSpec(losses=losses, label_smoothing=eps)
    if ok:
        validate_spec(spec)
    else:
        assert _error(losses=losses, label_smoothing=eps).field == "label_smoothing"


@pytest.mark.parametrize("kw,field", [
    ({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta"), ({"beta": float("nan")}, "beta"),
    ({"f_divergence": "reverse_kll"}, "f_divergence"), ({"discopop_tau": 0.0}, "discopop_tau"),
    ({"losses": ()}, "losses"), ({"losses": ("sigmoid", "sigmoid"), "weights": (1.0, 1.0)}, "losses"),
])
def test_other_spec_errors(kw, field):
    assert _error(**kw).field == field


def test_default_spec_and_all_losses_validate():
    validate_spec(LossSpec())
    validate_spec(LossSpec(losses=tuple(ALL_LOSSES), weights=(1.0,) * len(ALL_LOSSES), label_smoothing=0.1))


def test_parse_loss_list():
    assert parse_loss_list("sigmoid", None) == (("sigmoid",), (1.0,))
    assert parse_loss_list(" sigmoid , sft ", None) == (("sigmoid", "sft"), (1.0, 1.0))
    with pytest.raises(DpocliError) as info:
        parse_loss_list("sigmoid,sft", "1,abc")
    assert info.value.field == "weights"
    with pytest.raises(DpocliError):
        parse_loss_list("sigmoid,,sft", None)


# ---- WPO (use_weighting) and LD-DPO's plain sums for sft ----

def _wpo_inputs(**extra) -> LossInputs:
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return LossInputs(t(-10.0, -4.0), t(-12.0, -3.0), t(-11.0, -4.0), t(-11.0, -3.5),
                      torch.tensor([4, 2]), torch.tensor([3, 5]), **extra)


def test_wpo_multiplies_every_loss_by_the_pair_weights():
    """Pair 0: w_w = exp(-2/4), w_l = exp(-3/3), so the weight is exp(-1.5); pair 1: exp(-1/2)·exp(-5/5).
    h_0 = (−10+11) − (−12+11) = 2 and h_1 = 0 − 0.5 = −0.5; sigmoid loss −log σ(0.1·h)."""
    x = _wpo_inputs(chosen_wpo_logps=torch.tensor([-2.0, -1.0], dtype=torch.float64),
                    rejected_wpo_logps=torch.tensor([-3.0, -5.0], dtype=torch.float64))
    spec = LossSpec(losses=("sigmoid", "sft"), weights=(1.0, 0.5), use_weighting=True)
    out = compute_loss(x, spec)
    w = [math.exp(-1.5), math.exp(-1.5)]
    sig = [math.log1p(math.exp(-0.2)) * w[0], math.log1p(math.exp(0.05)) * w[1]]
    nll = (10.0 + 4.0) / 6.0
    sft = [nll * w[0], nll * w[1]]
    assert out.per_pair_loss.tolist() == pytest.approx([s + 0.5 * f for s, f in zip(sig, sft)], abs=1e-12)
    assert float(out.components["sigmoid"]) == pytest.approx(sum(sig) / 2, abs=1e-12)


def test_wpo_without_weights_or_with_sorting_losses_is_refused():
    with pytest.raises(ValueError, match="token_stats"):
        compute_loss(_wpo_inputs(), LossSpec(use_weighting=True))
    with pytest.raises(DpocliError, match="aot"):
        validate_spec(LossSpec(losses=("aot",), use_weighting=True))


def test_sft_uses_plain_sums_under_ld_alpha():
    """LD-DPO changes the sums the DPO terms see, not TRL's sft term: −(−20 − 5)/(4 + 2)."""
    x = _wpo_inputs(policy_chosen_plain_logps=torch.tensor([-20.0, -5.0], dtype=torch.float64))
    out = compute_loss(x, LossSpec(losses=("sft",)))
    assert float(out.loss) == pytest.approx(25.0 / 6.0, abs=1e-12)
