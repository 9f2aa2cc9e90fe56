"""dpocli.objective.losses against values and refusals recorded from TRL 1.16's own `DPOTrainer`.

tests/fixtures/trl_losses.json is written by tests/fixtures/make_trl_losses.py: for every TRL loss
type x f-divergence x label smoothing x β it constructs a real DPOTrainer (a constructor ValueError
is a refusal) and runs its `_compute_loss` on two fixed batches, for several α. dpocli must give
TRL's number, or refuse; it refuses exactly where TRL refuses, and also where TRL silently ignores
label smoothing (the fixture shows that TRL's value is then the ε = 0 value).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpocli.errors import DpocliError
from dpocli.objective.losses import LossInputs, LossSpec, compute_loss, validate_spec

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "trl_losses.json").read_text())
RECORDS = FIXTURE["records"]


def _id(r: dict) -> str:
    alpha = f"-a{r['f_alpha']}" if r["f_divergence"] == "alpha_divergence" and "f_alpha" in r else ""
    return f"{r['loss']}-{r['f_divergence']}{alpha}-eps{r['label_smoothing']}-b{r['beta']}"


def _spec(r: dict) -> LossSpec:
    return LossSpec(losses=(r["loss"],), beta=r["beta"], label_smoothing=r["label_smoothing"],
                    f_divergence=r["f_divergence"], f_alpha=r.get("f_alpha", 0.5),
                    discopop_tau=FIXTURE["discopop_tau"])


def _inputs(batch: dict) -> LossInputs:
    """The batch in float32, with policy sums rounded as TRL's saw them: the generator spreads each
    sum evenly over its completion tokens and TRL sums them back over a padded row."""
    def trl_sum(totals, lens):
        width = max(FIXTURE["batches"]["hand"]["chosen_len"] + FIXTURE["batches"]["hand"]["rejected_len"]
                    + batch["chosen_len"] + batch["rejected_len"])
        rows = torch.zeros(len(totals), width, dtype=torch.float32)
        for i, (total, n) in enumerate(zip(totals, lens)):
            rows[i, :n] = total / n
        return rows.sum(dim=1)
    f32 = lambda key: torch.tensor(batch[key], dtype=torch.float32)  # noqa: E731
    return LossInputs(trl_sum(batch["policy_chosen_logps"], batch["chosen_len"]),
                      trl_sum(batch["policy_rejected_logps"], batch["rejected_len"]),
                      f32("ref_chosen_logps"), f32("ref_rejected_logps"),
                      torch.tensor(batch["chosen_len"]), torch.tensor(batch["rejected_len"]))


def test_fixture_covers_every_trl_loss_and_f_divergence():
    assert FIXTURE["trl_version"] == "1.16.0"
    assert {r["loss"] for r in RECORDS} == {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert {r["f_divergence"] for r in RECORDS} == {"reverse_kl", "forward_kl", "js_divergence",
                                                    "alpha_divergence"}
    assert any("refused" in r for r in RECORDS) and any("loss_by_batch" in r for r in RECORDS)


@pytest.mark.parametrize("record", [r for r in RECORDS if "refused" in r], ids=_id)
def test_refused_where_trl_refuses(record):
    with pytest.raises(DpocliError) as info:
        validate_spec(_spec(record))
    assert "\n" not in info.value.one_line()
    want_field = "label_smoothing" if "Label smoothing" in record["refused"] else "f_divergence"
    assert info.value.field == want_field, (record["refused"], info.value.one_line())


def _ignored_eps(r: dict) -> bool:
    return r["label_smoothing"] > 0 and r["loss"] not in {"robust", "exo_pair", "aot", "aot_unpaired"}


@pytest.mark.parametrize("record", [r for r in RECORDS if "loss_by_batch" in r and _ignored_eps(r)], ids=_id)
def test_eps_that_trl_ignores_is_refused(record):
    with pytest.raises(DpocliError) as info:
        validate_spec(_spec(record))
    assert info.value.field == "label_smoothing"
    # The fact behind the refusal: TRL's value with ε is its value without ε.
    plain = next(r for r in RECORDS if "loss_by_batch" in r and r["label_smoothing"] == 0.0
                 and all(r[k] == record[k] for k in ("loss", "f_divergence", "beta"))
                 and r.get("f_alpha") == record.get("f_alpha"))
    assert plain["loss_by_batch"] == record["loss_by_batch"]


# Both sides work in float32 on the same input bits. 12 of the 15 loss types come out bit-identical;
# the rest differ by rounding only: exo_pair's log ε constants (float64 here, float32 in TRL; 8e-7
# relative), sft's sum/count against TRL's token mean (1e-7), discopop's stable rewrite (1e-7).
REL_TOL = 2e-6


@pytest.mark.parametrize("record", [r for r in RECORDS if "loss_by_batch" in r and not _ignored_eps(r)],
                         ids=_id)
def test_value_equals_trl(record):
    spec = _spec(record)
    for name, batch in FIXTURE["batches"].items():
        want = record["loss_by_batch"][name]
        got = compute_loss(_inputs(batch), spec).loss.item()
        if math.isfinite(want):
            assert math.isclose(got, want, rel_tol=REL_TOL, abs_tol=1e-6), (name, got, want)
        elif record["loss"] == "discopop":
            # TRL's literal m·exp(-z) is 0·inf = NaN (or inf) for z << 0; dpocli's rewrite of the same
            # product stays finite (a documented, deliberate difference).
            assert math.isfinite(got), (name, got, want)
        else:
            # e.g. ipo at α = 4: ((e^80 - 1)/3)² overflows float32 on both sides; dpocli's training
            # loop then stops with a non-finite-loss error.
            assert not math.isfinite(got), (name, got, want)
