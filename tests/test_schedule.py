"""--scheduler and --optim: every schedule's per-step rate equals transformers' own LambdaLR over a
whole run; Adafactor steps like HF Trainer's optim="adafactor"; flags a choice ignores are refused."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import MODEL, invoke
from dpocli.errors import DpocliError
from dpocli.train import schedule
from dpocli.train.config import TrainConfig


def cfg(**kw) -> TrainConfig:
    return TrainConfig(cache="c", model="m", out="o", **kw)


def our_rates(config: TrainConfig, total: int) -> list[float]:
    """The learning rate of each step of a run, through dpocli's optimizer and LambdaLR."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    sched = schedule.make_scheduler(opt, config, total)
    rates = []
    for _ in range(total):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return rates


def hf_rates(name: str, warmup: int, total: int, lr: float, kwargs: dict) -> list[float]:
    """The same from transformers' get_scheduler (HF Trainer's create_scheduler), or a closed form."""
    transformers_opt = pytest.importorskip("transformers.optimization")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = transformers_opt.get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                                           scheduler_specific_kwargs=kwargs)
    rates = []
    for _ in range(total):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return rates


CASES = [  # (our options, transformers' name, its scheduler_specific_kwargs)
    (dict(scheduler="linear", warmup_steps=3), "linear", {}),
    (dict(scheduler="cosine", warmup_ratio=0.1), "cosine", {}),
    (dict(scheduler="constant"), "constant", {}),
    (dict(scheduler="constant_with_warmup", warmup_steps=4), "constant_with_warmup", {}),
    (dict(scheduler="inverse_sqrt", warmup_steps=4), "inverse_sqrt", {}),
    (dict(scheduler="inverse_sqrt"), "inverse_sqrt", {}),  # no warm-up: timescale 10 000
    (dict(scheduler="cosine_with_min_lr", warmup_steps=2, min_lr_rate=0.1), "cosine_with_min_lr",
     {"min_lr_rate": 0.1}),
    (dict(scheduler="warmup_stable_decay", warmup_steps=3, num_decay_steps=5), "warmup_stable_decay",
     {"num_decay_steps": 5}),
    (dict(scheduler="warmup_stable_decay", warmup_steps=2, decay_ratio=0.3, min_lr_rate=0.2,
          decay_type="linear"), "warmup_stable_decay",
     {"num_decay_steps": 6, "min_lr_ratio": 0.2, "decay_type": "linear"}),
    (dict(scheduler="warmup_stable_decay", decay_ratio=0.5, decay_type="1-sqrt"), "warmup_stable_decay",
     {"num_decay_steps": 10, "decay_type": "1-sqrt"}),
]


@pytest.mark.parametrize("ours,name,kwargs", CASES, ids=[c[1] + str(i) for i, c in enumerate(CASES)])
def test_every_schedule_equals_transformers_over_a_run(ours, name, kwargs):
    total, lr = 20, 3e-4
    config = cfg(lr=lr, **ours)
    config.check()
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total)
    expected = hf_rates(name, warmup, total, lr, kwargs)
    assert our_rates(config, total) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_schedules_by_hand():
    """Closed forms, independent of transformers: warm-up 2 of 6 steps, then the decay's shape."""
    def f(step, **kw):
        return schedule.schedule_of(cfg(**kw), 6).factor(step)
    assert [f(s, scheduler="linear", warmup_steps=2) for s in range(6)] == pytest.approx(
        [0, 0.5, 1, 0.75, 0.5, 0.25])
    assert [f(s, scheduler="constant") for s in range(3)] == [1, 1, 1]  # no warm-up, as transformers
    # cosine to a floor of 0.2: 0.2 + 0.8 * (1 + cos(pi * 1/4)) / 2 at the 2nd decay step
    assert f(3, scheduler="cosine_with_min_lr", warmup_steps=2, min_lr_rate=0.2) == pytest.approx(
        0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    # WSD, 1 warm-up + 3 stable + 2 linear-decay steps to 0.5: warm-up starts at the floor
    wsd = [f(s, scheduler="warmup_stable_decay", warmup_steps=1, num_decay_steps=2, min_lr_rate=0.5,
             decay_type="linear") for s in range(6)]
    assert wsd == pytest.approx([0.5, 1, 1, 1, 1, 0.75])
    # inverse sqrt, warm-up 4: 1/sqrt(step/4) afterwards
    assert f(5, scheduler="inverse_sqrt", warmup_steps=4) == pytest.approx(1 / math.sqrt(5 / 4))


@pytest.mark.parametrize("kw,flag", [
    (dict(scheduler="linear", min_lr_rate=0.1), "--min-lr-rate"),
    (dict(scheduler="cosine_with_min_lr"), "--scheduler"),
    (dict(scheduler="cosine_with_min_lr", min_lr_rate=1.5), "--min-lr-rate"),
    (dict(scheduler="constant", warmup_steps=3), "--scheduler constant"),
    (dict(scheduler="constant", warmup_ratio=0.1), "--scheduler constant"),
    (dict(scheduler="cosine", num_decay_steps=3), "--num-decay-steps"),
    (dict(scheduler="linear", decay_type="cosine"), "--decay-type"),
    (dict(scheduler="warmup_stable_decay"), "--scheduler warmup_stable_decay"),
    (dict(scheduler="warmup_stable_decay", num_decay_steps=2, decay_ratio=0.1),
     "--scheduler warmup_stable_decay"),
    (dict(scheduler="warmup_stable_decay", decay_ratio=0.1, decay_type="exp"), "--decay-type"),
    (dict(scheduler="cosine_restarts"), "--scheduler"),
    (dict(optim="sgd"), "--optim"),
    (dict(optim="adafactor", adam_beta2=0.95), "--adam-beta2"),
    (dict(optim="adafactor", adam_eps=1e-6), "--adam-epsilon"),
])
def test_flags_the_choice_ignores_are_refused(kw, flag):
    with pytest.raises(DpocliError) as err:
        cfg(**kw).check()
    assert err.value.field == flag


def test_wsd_longer_than_the_run_is_refused():
    """The rule: warm-up + decay <= total steps. transformers' get_wsd_schedule takes a longer one
    silently (its stable phase goes negative): with 3 warm-up and 5 decay steps in a 6-step run the
    rate never reaches --lr, and the decay begins 2/5 of the way in."""
    hf = hf_rates("warmup_stable_decay", 3, 6, 1.0, {"num_decay_steps": 5})
    assert hf[:3] == pytest.approx([0, 1 / 3, 2 / 3]) and max(hf) < 1.0
    assert hf[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5)))
    wsd = dict(scheduler="warmup_stable_decay", warmup_steps=3, num_decay_steps=5)
    with pytest.raises(DpocliError, match="take more than the run's 6 steps") as err:
        schedule.schedule_of(cfg(**wsd), 6)
    assert err.value.field == "--scheduler warmup_stable_decay"
    schedule.schedule_of(cfg(scheduler="warmup_stable_decay", warmup_steps=3, num_decay_steps=3), 6)  # fits
    with pytest.raises(DpocliError, match="--max-steps"):  # the run's length known: refused by check()
        cfg(**wsd, max_steps=6).check()
    config = cfg(**wsd, batch_size=8)
    config.check()  # the length needs the cache: 48 pairs / 8 = 6 steps, 2 ranks 3 steps
    assert config.total_steps(48) == 6 and config.total_steps(48, world_size=2) == 3
    with pytest.raises(DpocliError, match=r"--epochs 1"):
        config.check_steps(48)
    cfg(**wsd, batch_size=4).check_steps(48)  # 12 steps


def test_wsd_that_does_not_fit_is_refused_before_the_model_loads(small_cache, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("dpocli.train.loop.build_policy", never)
    out = tmp_path / "run"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", out, "--batch-size", 8,
                     "--scheduler", "warmup_stable_decay", "--warmup-ratio", 0.5, "--decay-ratio", 0.6])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and not out.exists(), result.stderr
    assert "warm-up (3 steps, --warmup-ratio) plus decay (4 steps, --decay-ratio)" in errors[0]
    assert "6 steps (--epochs 1 over the cache)" in errors[0]


def test_refusal_happens_before_anything_is_written(small_cache, tmp_path):
    out = tmp_path / "run"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", out, "--scheduler", "linear",
                     "--min-lr-rate", 0.1])
    assert result.exit_code == 2 and "--min-lr-rate" in result.stderr and not out.exists()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 1))


def _steps(model, opt, n=3):
    torch.manual_seed(1)
    for _ in range(n):
        x = torch.randn(4, 6)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_adafactor_steps_like_hf_trainers(tmp_path):
    """dpocli's --optim adafactor against the optimizer HF Trainer builds for optim="adafactor"."""
    from transformers import Trainer, TrainingArguments
    config = cfg(optim="adafactor", lr=1e-2, weight_decay=0.1)
    ours = _model()
    ours_after = _steps(ours, schedule.make_optimizer(ours, config, torch.device("cpu")))
    args = TrainingArguments(output_dir=str(tmp_path), optim="adafactor", learning_rate=1e-2,
                             weight_decay=0.1, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    theirs = _model()
    decay = [p for p in theirs.parameters() if p.ndim >= 2]  # HF: no decay on biases and norms
    no_decay = [p for p in theirs.parameters() if p.ndim < 2]
    opt = cls([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], **kwargs)
    theirs_after = _steps(theirs, opt)
    assert all(torch.equal(a, b) for a, b in zip(ours_after, theirs_after))
    assert ours_after[0].ne(_model()[0].weight).any()  # it did train


def test_8bit_optimizers_pass_hf_settings_to_bitsandbytes(monkeypatch):
    """bitsandbytes' AdamW with 8-bit states (paged or not), AdamW's β, ε and decay groups; a fake
    module stands in for bitsandbytes, which needs a GPU build."""
    import sys
    import types
    made = []
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW=lambda groups, **kw: made.append((groups, kw)) or "bnb")
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    for name, paged in (("adamw_8bit", False), ("paged_adamw_8bit", True)):
        config = cfg(optim=name, lr=2e-5, adam_beta2=0.95, weight_decay=0.01)
        assert schedule.make_optimizer(_model(), config, torch.device("cpu")) == "bnb"
        groups, kw = made[-1]
        assert kw == {"lr": 2e-5, "betas": (0.9, 0.95), "eps": 1e-8, "optim_bits": 8, "is_paged": paged}
        assert [g["weight_decay"] for g in groups] == [0.01, 0.0]


def test_8bit_without_bitsandbytes_is_a_usage_error(small_cache, tmp_path, monkeypatch):
    real = __import__("importlib").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real(name, *a))
    out = tmp_path / "run"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", out, "--optim", "paged_adamw_8bit"])
    assert result.exit_code == 2 and "bitsandbytes" in result.stderr and "dpocli[bnb]" in result.stderr
    assert not out.exists()


def test_optimizer_is_recorded_and_resume_refuses_another(small_cache, tmp_path):
    import json
    run = tmp_path / "run"
    base = ["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 1, "--batch-size", 4,
            "--quiet"]
    assert invoke(base + ["--optim", "adafactor"]).exit_code == 0
    assert json.loads((run / "run_config.json").read_text())["optim"] == "adafactor"
    result = invoke(base + ["--resume"])  # default --optim adamw
    assert result.exit_code == 2 and "optim" in result.stderr

