"""Each option declared once (dpocli/options.py): the same flag means the same thing, with the same
help and default, on every command that takes it, and every config is built from the groups."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import typer

from conftest import MODEL, invoke
from dpocli import options
from dpocli.cache import options as cache_options
from dpocli.cli import option_params
from dpocli.cli.app import app, cache_app
from dpocli.eval import options as eval_options
from dpocli.eval.config import EvalConfig
from dpocli.eval.verify import run_verify
from dpocli.objective.losses import SPEC_FROM, LossSpec
from dpocli.objective.spec import LOSS_OPTIONS, spec_from_options
from dpocli.precompute.config import PrecomputeConfig
from dpocli.train.config import TrainConfig

try:
    import tomllib
except ImportError:  # Python 3.10: the tomli backport, a dependency there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
EAGER = {"--config", "--print-config", "--help"}
GROUPS = [cls for module in (options, cache_options, eval_options) for cls in vars(module).values()
          if isinstance(cls, type) and option_params.is_group(cls)]


def commands() -> dict[str, tuple]:
    """'train' / 'cache info' -> (the function typer registered, the click command)."""
    found = {}
    for typer_app, prefix in ((app, ""), (cache_app, "cache ")):
        click_commands = typer.main.get_command(typer_app).commands
        for registered in typer_app.registered_commands:
            found[prefix + registered.name] = (registered.callback, click_commands[registered.name])
    return found


COMMANDS = commands()


def flag_options(click_command) -> dict[str, object]:
    """Long flag -> click option, without --help and the eager options."""
    return {
        opt: p
        for p in click_command.params
        for opt in getattr(p, "opts", ())
        if opt.startswith("--") and opt not in EAGER and not p.is_eager
    }


def test_every_command_takes_option_groups_and_the_eager_options():
    assert set(COMMANDS) == {"precompute-ref", "train", "eval", "report", "cache info", "cache verify",
                             "cache audit", "cache filter", "cache split", "cache merge"}
    for name, (callback, click_command) in COMMANDS.items():
        assert options.OutputFormat in callback.option_groups.values(), name
        opts = {o for p in click_command.params for o in getattr(p, "opts", ())}
        assert {"--config", "--print-config", "--json", "--quiet"} <= opts, name


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_group_field_is_a_flag_of_the_command(name):
    callback, click_command = COMMANDS[name]
    params = {p.name: p for p in click_command.params}
    for group in callback.option_groups.values():
        for f in dataclasses.fields(group):
            param = params[option_params.param_name(f)]
            assert tuple(param.opts + param.secondary_opts) == option_params.flags_of(f), f.name
            assert param.help == f.metadata["help"], f.name
            default = None if f.default is dataclasses.MISSING else f.default
            assert param.default == ((not default) if f.metadata["negate"] else default), f.name
            assert param.required == (f.default is dataclasses.MISSING), f.name


def test_a_flag_on_several_commands_has_one_help_and_default():
    """Read from the click commands, not from the groups, so a second declaration anywhere shows."""
    seen: dict[str, dict] = {}
    for name, (_, click_command) in COMMANDS.items():
        for flag, param in flag_options(click_command).items():
            seen.setdefault(flag, {})[name] = (param.help, param.default, tuple(param.opts))
    shared = {flag: by_command for flag, by_command in seen.items() if len(by_command) > 1}
    assert {
        "--compile",
        "--packing",
        "--prefix-sharing",
        "--overwrite",
        "--ipo-sum",
        "--device",
        "--trust-remote-code",
        "--json",
        "--quiet",
        "--beta",
    } <= set(shared)
    for flag, by_command in shared.items():
        if flag not in options.PER_COMMAND:
            assert len(set(by_command.values())) == 1, (flag, by_command)


def test_each_flag_is_declared_once():
    declared: dict[str, list[str]] = {}
    for cls in GROUPS:
        for f in dataclasses.fields(cls):
            for flag in option_params.flags_of(f):
                declared.setdefault(flag, []).append(f"{cls.__name__}.{f.name}")
    twice = {flag for flag, where in declared.items() if len(where) > 1}
    # The flags whose meaning is each command's own are exactly those declared more than once, and
    # no command takes two of their declarations.
    assert twice == options.PER_COMMAND
    for flag in twice:
        takers = []
        for where in declared[flag]:
            group = {cls.__name__: cls for cls in GROUPS}[where.split(".")[0]]
            takers += [n for n, (cb, _) in COMMANDS.items() if group in cb.option_groups.values()]
        assert len(takers) == len(set(takers)), (flag, declared[flag], takers)
    # Every flag a command shows comes from a group field, and cli/ declares only the eager ones
    # (option_params.py turns the group fields into typer options).
    for name, (_, click_command) in COMMANDS.items():
        assert set(flag_options(click_command)) <= set(declared), name
    declarations = [
        node
        for path in sorted((ROOT / "dpocli" / "cli").glob("*.py")) if path.name != "option_params.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Option"
    ]
    flags = sorted(node.args[0].value for node in declarations)
    assert flags == ["--config", "--print-config", "--version"]


def test_dtype_names_are_the_loadable_dtypes():
    from dpocli.model.load import DTYPES

    assert options.DTYPE_NAMES == tuple(DTYPES)


def test_groups_are_frozen():
    for cls in GROUPS:
        instance = cls(**{f.name: "x" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING})
        for f in dataclasses.fields(cls):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(instance, f.name, None)


# ---------------------------------------------------------------- configs built from the groups


def group_fields(command: str) -> dict[str, dataclasses.Field]:
    callback, _ = COMMANDS[command]
    return {
        f.name: f
        for g in callback.option_groups.values()
        if g is not options.OutputFormat
        for f in dataclasses.fields(g)
    }


def defaults_of(fields: dict[str, dataclasses.Field]) -> dict:
    return {name: f.default for name, f in fields.items() if f.default is not dataclasses.MISSING}


# The LM head's chunk size is not a flag: eval replays precompute's batching with the default chunks.
NOT_FLAGS = {"chunk_size"}


@pytest.mark.parametrize(
    "command,config,arguments",
    [
        ("train", TrainConfig, {"cache"}),
        ("precompute-ref", PrecomputeConfig, {"input"}),
        ("eval", EvalConfig, {"cache", "models", "loss_given"}),
    ],
)
def test_config_fields_are_group_fields_with_the_same_defaults(command, config, arguments):
    fields = group_fields(command)
    fields.pop("model", None) if command == "eval" else None  # eval's --model (repeatable) -> models
    config_fields = {f.name: f for f in dataclasses.fields(config)}
    assert set(fields) | arguments == set(config_fields) - NOT_FLAGS
    config_defaults = defaults_of(config_fields)
    for name, default in defaults_of(fields).items():
        assert config_defaults[name] == default, name


@pytest.mark.parametrize(
    "command,driver,arguments",
    [
        ("cache verify", run_verify, {"cache_dir"}),
    ],
)
def test_driver_keywords_are_group_fields_with_the_same_defaults(command, driver, arguments):
    fields = group_fields(command)
    fields.pop("model", None) if command == "eval" else None  # eval's --model (repeatable) -> models
    keywords = inspect.signature(driver).parameters
    assert set(fields) | arguments == set(keywords)
    for name, default in defaults_of(fields).items():
        assert keywords[name].default == default, name


def test_loss_group_is_the_loss_spec():
    """Each loss option is declared once, in LossOpts: the spec takes its fields from the group."""
    assert {f.name for f in dataclasses.fields(options.LossOpts)} == set(LOSS_OPTIONS)
    spec_fields = {f.name: f for f in dataclasses.fields(LossSpec)}
    for f in dataclasses.fields(options.LossOpts):
        if f.name in SPEC_FROM:  # turned into the spec's loss list and weights
            assert f.name not in spec_fields
        else:
            assert spec_fields[f.name].default == f.default, f.name
    assert spec_from_options(options.LossOpts()) == LossSpec()
    assert options.LossOpts().f_alpha == 0.5  # TRL's f_alpha_divergence_coef


# ---------------------------------------------------------------- the new flags reach the optimizer

ADAM_FLAGS = ["--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-epsilon", "1e-6"]


def test_adam_flags_reach_the_optimizer_and_the_resolved_config(small_cache, tmp_path, monkeypatch):
    import torch

    made = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    run = tmp_path / "run"
    result = invoke(
        ["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 1, "--quiet", *ADAM_FLAGS]
    )
    assert result.exit_code == 0, result.stderr
    assert len(made) == 1
    group = made[0].param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    saved = json.loads((run / "run_config.json").read_text())
    assert (saved["adam_beta1"], saved["adam_beta2"], saved["adam_eps"]) == (0.8, 0.95, 1e-6)
    resolved = tomllib.loads((run / "config.resolved.toml").read_text())
    assert (resolved["adam-beta1"], resolved["adam-beta2"], resolved["adam-epsilon"]) == (0.8, 0.95, 1e-6)


def test_adam_flags_in_a_config_file_and_print_config(tmp_path):
    defaults = tomllib.loads(invoke(["train", "--print-config"]).stdout)
    assert (defaults["adam-beta1"], defaults["adam-beta2"], defaults["adam-epsilon"]) == (0.9, 0.999, 1e-8)
    cfg = tmp_path / "adam.toml"
    cfg.write_text("[train]\nadam-beta1 = 0.7\nadam_epsilon = 1e-5\n")
    printed = tomllib.loads(invoke(["train", "--config", cfg, "--print-config"]).stdout)
    assert (printed["adam-beta1"], printed["adam-beta2"], printed["adam-epsilon"]) == (0.7, 0.999, 1e-5)


@pytest.mark.parametrize(
    "flags,field",
    [
        (["--adam-beta1", "1"], "--adam-beta1"),
        (["--adam-beta2", "-0.1"], "--adam-beta2"),
        (["--adam-epsilon", "-1"], "--adam-epsilon"),
        (["--dtype", "fp8"], "--dtype"),
    ],
)
def test_a_group_refuses_its_bad_values_before_any_work(flags, field, tmp_path):
    result = invoke(["train", tmp_path / "no-cache", "--model", "m", "--out", tmp_path / "r", *flags])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: field '{field}'") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "r").exists()
