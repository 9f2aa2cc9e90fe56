"""`dpo cache info|verify|audit|filter|split|merge`: the cache as a dataset. None loads a model
(only `verify --rescore` does, through its lazy driver), so they start fast in shell pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dpocli.cache.options import AuditOpts, FilterOpts, MergeOpts, SplitOpts
from dpocli.cli.apps import EPILOG, cache_app
from dpocli.cli.config_options import ConfigOpt, PrintConfigOpt
from dpocli.cli.failures import emit_result, run_driver
from dpocli.cli.option_params import config_kwargs, with_options
from dpocli.eval.options import VerifyOpts
from dpocli.options import LoadOpts, OutputFormat, OutputOpts


@cache_app.command("info", epilog=EPILOG)
@with_options
def cache_info(
    cache: Annotated[Path, typer.Argument(help="A cache folder written by precompute-ref.")],
    fmt: OutputFormat,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    """Manifest summary: what produced the cache, row counts, dropped rows by reason, lengths."""
    from dpocli.cache.manifest import info as cache_info_dict
    from dpocli.cli.tables import cache_info_table

    info = run_driver(lambda: cache_info_dict(cache), quiet=fmt.quiet, uses_torch=False)
    emit_result(info, fmt.json, cache_info_table)


@cache_app.command("verify", epilog=EPILOG)
@with_options
def cache_verify(
    cache: Annotated[Path, typer.Argument(help="A cache folder written by precompute-ref.")],
    run: VerifyOpts,
    load: LoadOpts,
    fmt: OutputFormat,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    """Recompute shard checksums, check values are finite, and optionally re-score rows."""
    from dpocli.cli.tables import verify_table
    from dpocli.eval.verify import run_verify

    result = run_driver(lambda: run_verify(str(cache), **config_kwargs(run, load)), quiet=fmt.quiet,
                  uses_torch=run.rescore > 0)
    emit_result(result, fmt.json, verify_table)


# ---- the cache as a dataset (issue 26): no torch; dpocli/cache/audit.py and cache_ops.py do the work

CacheArg = Annotated[Path, typer.Argument(help="A cache folder (written by precompute-ref or derived).")]


def run_cache_op(fmt, work, table: str) -> None:
    from dpocli.cli import tables as summaries

    emit_result(run_driver(work, quiet=fmt.quiet, uses_torch=False), fmt.json, getattr(summaries, table))


@cache_app.command("audit", epilog=EPILOG + "  Example: dpo cache audit ./ref-cache --out audit.html")
@with_options
def cache_audit(cache: CacheArg, run: AuditOpts, fmt: OutputFormat, config: ConfigOpt = None,
                print_config: PrintConfigOpt = False):
    """Lengths, truncation, identical/duplicate/conflicting pairs and the reference's own margins."""
    from dpocli.cache.audit import run_audit

    run_cache_op(fmt, lambda: run_audit(str(cache), **config_kwargs(run)), "audit_table")


@cache_app.command("filter", epilog=EPILOG + "  Example: dpo cache filter ./ref-cache --out ./clean --dedupe")
@with_options
def cache_filter(cache: CacheArg, run: FilterOpts, output: OutputOpts, fmt: OutputFormat,
                 config: ConfigOpt = None, print_config: PrintConfigOpt = False):
    """Write a new cache holding the rows that pass every option given."""
    from dpocli.cache.ops import run_filter

    run_cache_op(fmt, lambda: run_filter(str(cache), **config_kwargs(run, output)), "derived_table")


@cache_app.command("split", epilog=EPILOG + "  Example: dpo cache split ./c --out-train ./tr --out-test ./te")
@with_options
def cache_split(cache: CacheArg, run: SplitOpts, output: OutputOpts, fmt: OutputFormat,
                config: ConfigOpt = None, print_config: PrintConfigOpt = False):
    """Split a cache in two by a stable hash of the row id (a held-out cache without a new precompute)."""
    from dpocli.cache.ops import run_split

    run_cache_op(fmt, lambda: run_split(str(cache), **config_kwargs(run, output)), "split_table")


@cache_app.command("merge", epilog=EPILOG + "  Example: dpo cache merge ./cache-a ./cache-b --out ./both")
@with_options
def cache_merge(caches: Annotated[list[Path], typer.Argument(help="Two or more caches of one reference.")],
                run: MergeOpts, output: OutputOpts, fmt: OutputFormat, config: ConfigOpt = None,
                print_config: PrintConfigOpt = False):
    """Merge caches made by the same reference, tokenizer and settings; each id is kept once."""
    from dpocli.cache.ops import run_merge

    paths = [str(c) for c in caches]
    run_cache_op(fmt, lambda: run_merge(paths, **config_kwargs(run, output)), "derived_table")


