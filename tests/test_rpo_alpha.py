"""--rpo-alpha A: the documented alias of --loss sigmoid,sft --loss-weights 1,A (RPO, TRL's rpo_alpha).

Expected values: the explicit form through dpocli, and TRL's NLL term written out here from its
definition (the mean of -log p over every chosen completion token of the batch)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import MODEL, invoke, read_jsonl
from dpocli.errors import DpocliError
from dpocli.objective.losses import LossInputs, compute_loss
from dpocli.objective.spec import spec_from_options
from dpocli.options import LossOpts


def _inputs(seed=0):
    """Per-token log-probs of 4 pairs with ragged completion lengths, and their sums."""
    g = torch.Generator().manual_seed(seed)
    lens_w, lens_l = torch.tensor([3, 5, 2, 4]), torch.tensor([4, 1, 6, 2])
    tok_w = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    mask_w = torch.arange(6)[None] < lens_w[:, None]
    sums = [(-torch.rand(4, generator=g, dtype=torch.float64) * 10) for _ in range(3)]
    x = LossInputs((tok_w * mask_w).sum(1), sums[0], sums[1], sums[2], lens_w, lens_l)
    return x, tok_w, mask_w


def test_alias_gives_the_explicit_loss_and_trl_rpo():
    x, tok_w, mask_w = _inputs()
    alias = compute_loss(x, spec_from_options(LossOpts(rpo_alpha=0.7)))
    explicit = compute_loss(x, spec_from_options(LossOpts(loss="sigmoid,sft", loss_weights="1,0.7")))
    assert torch.equal(alias.loss, explicit.loss) and alias.components.keys() == {"sigmoid", "sft"}
    # RPO as TRL defines it: DPO's batch mean plus α times the token-mean NLL of the chosen tokens.
    h = (x.policy_chosen_logps - x.ref_chosen_logps) - (x.policy_rejected_logps - x.ref_rejected_logps)
    nll = -tok_w[mask_w].mean()
    assert float(alias.loss) == pytest.approx(float(-F.logsigmoid(0.1 * h).mean() + 0.7 * nll), rel=1e-12)


@pytest.mark.parametrize("kw", [dict(loss="ipo"), dict(loss="sigmoid,sft"), dict(loss_weights="2"),
                                dict(rpo_alpha=-1.0), dict(rpo_alpha=math.inf)])
def test_conflicts_and_bad_values_are_refused(kw):
    with pytest.raises(DpocliError) as err:
        spec_from_options(LossOpts(**{"rpo_alpha": 0.5, **kw}))
    assert err.value.field == "--rpo-alpha"


def test_training_with_the_alias_follows_the_explicit_form(small_cache, tmp_path):
    common = ["--max-steps", 2, "--batch-size", 4, "--lr", "1e-3", "--quiet"]
    runs = {}
    for name, flags in (("alias", ["--rpo-alpha", 0.5]), ("explicit", ["--loss", "sigmoid,sft",
                                                                       "--loss-weights", "1,0.5"])):
        out = tmp_path / name
        result = invoke(["train", small_cache, "--model", MODEL, "--out", out, *common, *flags])
        assert result.exit_code == 0, result.stderr
        runs[name] = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    keys = ("loss", "loss/sigmoid", "loss/sft", "rewards/margins")
    assert [[r[k] for k in keys] for r in runs["alias"]] == [[r[k] for k in keys] for r in runs["explicit"]]
    assert json.loads((tmp_path / "alias" / "run_config.json").read_text())["rpo_alpha"] == 0.5

    # dpo eval takes the run's --rpo-alpha; a --loss given to eval replaces it instead of conflicting.
    result = invoke(["eval", small_cache, "--model", tmp_path / "alias", "--json"])
    assert result.exit_code == 0, result.stderr
    assert "loss/sft" in json.loads(result.stdout)["models"][0]
    result = invoke(["eval", small_cache, "--model", tmp_path / "alias", "--loss", "ipo", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["loss_options"]["rpo_alpha"] is None


def test_alias_with_a_conflicting_loss_is_a_usage_error(small_cache, tmp_path):
    out = tmp_path / "run"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", out, "--rpo-alpha", 1, "--loss", "ipo"])
    assert result.exit_code == 2 and "--rpo-alpha" in result.stderr and not out.exists()
