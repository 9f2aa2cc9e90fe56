"""The loss flags as given (`options.LossOpts`) to the checked `LossSpec` the losses run with:
the loss list and its weights parsed, TRL's rpo_alpha spelled out, the ranges checked."""

from __future__ import annotations

import dataclasses
import math

from dpocli.errors import DpocliError
from dpocli.objective.losses import SPEC_FROM, LossSpec, validate_spec
from dpocli.options import LossOpts

# The loss options' names, as a run's run_config.json keys them (derived from the group).
LOSS_OPTIONS = tuple(f.name for f in dataclasses.fields(LossOpts))


def spec_from_options(opts: LossOpts) -> LossSpec:
    """The checked `LossSpec` for the loss options as given (train and eval build it here, alike).
    `router_aux_loss_coef` None stays None: the model's config decides once it is loaded."""
    names, weights = parse_loss_list(opts.loss, opts.loss_weights)
    if opts.rpo_alpha is not None:
        names, weights = _rpo(names, opts.loss_weights, opts.rpo_alpha)
    if opts.ld_alpha is not None and not 0.0 <= opts.ld_alpha <= 1.0:
        raise DpocliError(f"must be in [0, 1], got {opts.ld_alpha}", field="--ld-alpha")
    if opts.router_aux_loss_coef is not None and not opts.router_aux_loss_coef >= 0:
        raise DpocliError(f"must be >= 0, got {opts.router_aux_loss_coef}", field="--router-aux-loss-coef")
    kept = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name not in SPEC_FROM}
    spec = LossSpec(losses=names, weights=weights, **kept)
    validate_spec(spec)
    return spec


def _rpo(names: tuple[str, ...], loss_weights: str | None, alpha: float) -> tuple[tuple, tuple]:
    """TRL's rpo_alpha (v0.x; TRL 1.x spells it loss_type=["sigmoid", "sft"], loss_weights=[1, α]):
    the DPO loss plus α times the token-mean NLL of the chosen completions, which is `sft` here."""
    if names != ("sigmoid",) or loss_weights is not None:
        given = f"--loss {','.join(names)}" + (f" --loss-weights {loss_weights}" if loss_weights else "")
        raise DpocliError(f"means --loss sigmoid,sft --loss-weights 1,{alpha:g}; it cannot be combined with "
                          f"{given}", field="--rpo-alpha",
                          hint="drop --rpo-alpha and list sft with its weight in --loss")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise DpocliError(f"must be a finite number >= 0, got {alpha}", field="--rpo-alpha")
    return ("sigmoid", "sft"), (1.0, float(alpha))


def parse_loss_list(losses: str, weights: str | None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """"sigmoid,sft" and "1.0,0.5" -> (("sigmoid", "sft"), (1.0, 0.5)); weights default to all 1.0.

    Only parses; names and counts are checked by `validate_spec`.
    """
    names = tuple(part.strip() for part in losses.split(","))
    if not names or any(not n for n in names):
        raise DpocliError(f"'{losses}' has an empty entry (expected e.g. 'sigmoid,sft')", field="losses")
    if weights is None:
        return names, (1.0,) * len(names)
    try:
        values = tuple(float(part) for part in weights.split(","))
    except ValueError:
        raise DpocliError(f"'{weights}' is not a comma-separated list of numbers (e.g. '1.0,0.5')",
                          field="weights") from None
    return names, values
