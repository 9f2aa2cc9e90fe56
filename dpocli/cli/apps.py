"""The `dpo` application and its `dpo cache` group (commands register on them where they are
defined: cli/app.py, cli/cache_commands.py)."""

from __future__ import annotations

import typer

from dpocli.cli.failures import OneLineErrors

EPILOG = (
    "Exit codes: 0 success, 1 runtime failure (NaN loss, out of memory), 2 bad usage or "
    "input, 130 interrupted (state saved). Set DPOCLI_DEBUG=1 for tracebacks."
)

app = typer.Typer(
    name="dpo",
    cls=OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    epilog=EPILOG,
    help="Direct Preference Optimization in two stages: cache the reference once "
    "(precompute-ref), then train and evaluate from the cache.",
)
cache_app = typer.Typer(
    cls=OneLineErrors, no_args_is_help=True, help="Inspect and check reference caches.", epilog=EPILOG
)
app.add_typer(cache_app, name="cache")


