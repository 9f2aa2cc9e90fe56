"""The eager options every command takes: `--config FILE.toml` (loaded into click's defaults
before the other options) and `--print-config`; and a run's resolved options as TOML."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpocli import __version__
from dpocli.cli.config_file import config_defaults, to_toml
from dpocli.cli.failures import print_error
from dpocli.errors import DpocliError


def config_callback(ctx: typer.Context, param, value):
    """Eager: load the TOML file into click's default_map before other options are resolved."""
    if value:

        try:
            mapped = config_defaults(ctx.command, ctx.info_name, Path(value), shown=command_name(ctx),
                                     commands=config_tables(ctx.find_root().command))
        except DpocliError as err:
            print_error(err)
            raise typer.Exit(err.exit_code) from None
        ctx.default_map = {**(ctx.default_map or {}), **mapped}
        ctx.meta["dpocli.config"] = (str(value), set(mapped))  # so a bad value can name the file
    return value


def config_tables(group, prefix: str = "") -> dict:
    """Table name in a --config file -> (the command as typed after `dpo`, the command), for every
    command: a table is named after the command's last word (`[train]`, `[info]`)."""
    tables = {}
    for name, command in getattr(group, "commands", {}).items():
        if getattr(command, "commands", None) is not None:
            tables.update(config_tables(command, f"{prefix}{name} "))
        else:
            tables[name] = (f"{prefix}{name}", command)
    return tables


def print_config_callback(ctx: typer.Context, param, value):
    """Eager: print this command's options (with --config values applied) as TOML and exit."""
    if value:
        values = {p.name: (ctx.default_map or {}).get(p.name, p.default) for p in ctx.command.params}
        sys.stdout.write(options_toml(ctx, values, f"dpo {command_name(ctx)} options; use with --config"))
        raise typer.Exit(0)
    return value


def command_name(ctx: typer.Context) -> str:
    """The command as typed after `dpo`: `cache info`, where click's `ctx.info_name` is `info`."""
    names = []
    while ctx.parent is not None:  # the root context is `dpo` itself (or `python -m dpocli`)
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(reversed(names))


def options_toml(ctx: typer.Context, values: dict, title: str) -> str:
    """Every parameter of the command as TOML, keyed by flag name (unset ones commented out).
    `--print-config` and a run's config.resolved.toml both come from here, so they list the same
    keys, and either one can be given back to `--config`."""

    values = {p.name: values.get(p.name) for p in ctx.command.params}
    values = {name: str(v) if isinstance(v, Path) else v for name, v in values.items()}
    return to_toml(ctx.command, values, title)


# The eager options every command takes; the others are declared in dpocli/options.py.
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        is_eager=True,
        callback=config_callback,
        help="TOML file of options (flag names as keys, optionally under [COMMAND]); flags on the "
        "command line win.",
    ),
]
PrintConfigOpt = Annotated[
    bool,
    typer.Option(
        "--print-config",
        is_eager=True,
        callback=print_config_callback,
        help="Print this command's options as TOML (a --config to start from) and exit.",
    ),
]



def resolved_options(ctx: typer.Context) -> str:
    """The command's fully resolved options as TOML (replayable with --config)."""
    return options_toml(
        ctx,
        ctx.params,
        f"dpo {command_name(ctx)}, as resolved for this run (dpocli {__version__}); replay with --config",
    )


