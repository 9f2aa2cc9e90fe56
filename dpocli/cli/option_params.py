"""Option groups (options.py) as typer parameters: `@with_options` gives a command one flag per
group field, and hands the command one group instance per group; `config_kwargs` and `given`
turn the groups back into config arguments and into the set of options the user set.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable

import typer


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)


def param_name(f: dataclasses.Field) -> str:
    """The click parameter name: the field's, or its first long flag's when spelled otherwise
    (`--ipo-sum` -> ipo_sum), so `--config` files and `--print-config` use the flag's name."""
    return flags_of(f)[0][2:].replace("-", "_") if f.metadata["flags"] else f.name


def _typer_parameter(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    negate = f.metadata["negate"]
    default = f.default
    if negate:
        default = not default
    annotated = Annotated[bool if negate else hint, typer.Option(*flags_of(f), help=f.metadata["help"])]
    return inspect.Parameter(
        param_name(f),
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotated,
        default=inspect.Parameter.empty if default is dataclasses.MISSING else default,
    )


# Where option groups are declared: the shared ones, and the cache-as-a-dataset commands' own.
GROUP_MODULES = ("dpocli.options", "dpocli.cache.options", "dpocli.eval.options")


def is_group(annotation: Any) -> bool:
    return dataclasses.is_dataclass(annotation) and annotation.__module__ in GROUP_MODULES


def with_options(fn: Callable) -> Callable:
    """Let a typer command take option groups: each parameter of `fn` annotated with a group class
    becomes that group's flags in the signature typer reads, and `fn` receives one instance per
    group. Other parameters (the context, positional arguments, the eager options) pass through."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params, groups = [], {}
    for p in inspect.signature(fn).parameters.values():
        annotation = hints.get(p.name, p.annotation)
        if not is_group(annotation):
            # After a group's flags (keyword-only) every parameter must be keyword-only too; the
            # wrapper passes everything by name anyway.
            kind = inspect.Parameter.KEYWORD_ONLY if groups else p.kind
            params.append(p.replace(annotation=annotation, kind=kind))
            continue
        field_hints = typing.get_type_hints(annotation)
        groups[p.name] = annotation
        params += [_typer_parameter(f, field_hints[f.name]) for f in dataclasses.fields(annotation)]
    names = [p.name for p in params]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:  # two groups of one command declaring the same flag: a bug in this module
        raise TypeError(f"{fn.__name__}: flags declared twice: {sorted(duplicates)}")

    @functools.wraps(fn)
    def command(**kwargs):
        for arg, cls in groups.items():
            kwargs[arg] = make_group(cls, kwargs)
        return fn(**kwargs)

    # typer reads inspect.signature (which honours __signature__) and get_type_hints (which reads
    # __annotations__): both must describe the flags, not fn's own parameters.
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.option_groups = dict(groups)
    return command


def make_group(cls: type, values: dict) -> Any:
    """The group `cls` from click's parameter values (popped from `values`)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = values.pop(param_name(f))
        kwargs[f.name] = (not value) if f.metadata["negate"] else value
    return cls(**kwargs)


def config_kwargs(*groups: Any) -> dict:
    """The groups' fields as one flat dict of config arguments (paths as strings, as configs keep them)."""
    out = {}
    for group in groups:
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def given(ctx: typer.Context, cls: type) -> frozenset[str]:
    """Fields of group `cls` set on the command line or in --config (not left at their default)."""
    # By name: typer may bring its own copy of click's ParameterSource enum.
    return frozenset(
        f.name
        for f in dataclasses.fields(cls)
        if getattr(ctx.get_parameter_source(param_name(f)), "name", "DEFAULT") != "DEFAULT"
    )
