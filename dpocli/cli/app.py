"""The `dpo` command: parse flags, call a driver, print the result. No logic of its own.

stdout carries results only (a table, or one JSON object with --json); progress, logs and
errors go to stderr. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 130 interrupted
(Ctrl-C or SIGTERM, any command), 141 the reader of stdout went away (`| head`), quietly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpocli import __version__
from dpocli.cli.option_params import config_kwargs, given, with_options
from dpocli.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    DpocliError,
    RunFailure,
    is_out_of_memory,
)
from dpocli.io.console import emit_json, emit_table, err_console, interrupt_on_sigterm, set_quiet
from dpocli.options import (
    AuditOpts,
    CheckpointOpts,
    EvalOpts,
    FilterOpts,
    LayoutOpts,
    LoadOpts,
    LoraOpts,
    LossOpts,
    MergeOpts,
    ModelOpts,
    OptimOpts,
    OutputFormat,
    OutputOpts,
    PrecomputeOpts,
    QuantOpts,
    ReportOpts,
    SplitOpts,
    TrainOpts,
    VerifyOpts,
)

EPILOG = (
    "Exit codes: 0 success, 1 runtime failure (NaN loss, out of memory), 2 bad usage or "
    "input, 130 interrupted (state saved). Set DPOCLI_DEBUG=1 for tracebacks."
)


def _is_click_error(err: BaseException, name: str = "ClickException") -> bool:
    # typer >= 0.29 vendors click (typer._click), older typer uses click itself: match by class name.
    return any(cls.__name__ == name for cls in type(err).__mro__)


class _OneLineErrors(typer.core.TyperGroup):
    """Every failure reaches the user as one `error:` line and an exit code, never a traceback:
    click's usage errors (2), our DpocliError (2, or 1 at run time), anything else (1, a bug)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as err:  # typer.Exit never gets here: non-standalone click returns its code
            code = _report(err)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        """Ctrl-C / SIGTERM outside `_run` (a command's own imports): typer would exit 130 silently."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None


def _report(err: BaseException) -> int:
    """Print `err` as one line (plus a hint) on stderr; return the exit code."""
    debug = bool(os.environ.get("DPOCLI_DEBUG"))
    if isinstance(err, BrokenPipeError):  # `dpo ... | head`: the reader has all it wanted
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    if _is_click_error(err, "NoArgsIsHelpError"):
        sys.stdout.write(err.format_message() + "\n")  # the help text itself
        return 0
    if _is_click_error(err, "Abort"):
        err_console.print("interrupted")
        return EXIT_INTERRUPTED
    if _is_click_error(err):
        ctx, param = getattr(err, "ctx", None), getattr(err, "param", None)
        config_file, from_config = (ctx.meta.get("dpocli.config") if ctx else None) or (None, ())
        named = config_file if param is not None and param.name in from_config else None
        _print_error(
            DpocliError(
                err.format_message().strip().rstrip(".").replace("\n", " "),
                file=named,
                hint=f"see '{ctx.command_path} --help'" if ctx else None,
            )
        )
        return err.exit_code
    if isinstance(err, DpocliError):
        _print_error(err)
        if debug:
            _print_traceback(err)
        return err.exit_code
    if is_out_of_memory(err):
        _print_error(
            RunFailure("out of memory", hint="lower --batch-size / --max-tokens, or use a smaller --dtype")
        )
        return EXIT_RUNTIME
    if isinstance(err, RecursionError):
        # dpocli recurses only over what it reads (JSON, TOML, templates), and the readers it knows
        # refuse deep nesting naming file and row; one it does not know ends here, still as input.
        _print_error(DpocliError("a file this command reads nests lists or objects too deeply to read",
                                 hint="rerun with DPOCLI_DEBUG=1 to see which file"))
        if debug:
            _print_traceback(err)
        return EXIT_USAGE
    if isinstance(err, OSError):
        where = err.filename if getattr(err, "filename", None) else None
        _print_error(RunFailure(err.strerror or str(err) or type(err).__name__, file=where))
        return EXIT_RUNTIME
    first_line = str(err).splitlines()[0] if str(err) else ""
    _print_error(
        RunFailure(
            f"internal error ({type(err).__name__}: {first_line})",
            hint="this is a bug in dpocli; rerun with DPOCLI_DEBUG=1 for the traceback and report it",
        )
    )
    if debug:
        _print_traceback(err)
    return EXIT_RUNTIME


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still buffered
    does not fail again on the closed pipe (Python's documented recipe for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _print_traceback(err: BaseException) -> None:

    sys.stderr.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))


app = typer.Typer(
    name="dpo",
    cls=_OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    epilog=EPILOG,
    help="Direct Preference Optimization in two stages: cache the reference once "
    "(precompute-ref), then train and evaluate from the cache.",
)
cache_app = typer.Typer(
    cls=_OneLineErrors, no_args_is_help=True, help="Inspect and check reference caches.", epilog=EPILOG
)
app.add_typer(cache_app, name="cache")


def _config_callback(ctx: typer.Context, param, value):
    """Eager: load the TOML file into click's default_map before other options are resolved."""
    if value:
        from dpocli.cli.config_file import config_defaults

        try:
            mapped = config_defaults(ctx.command, ctx.info_name, Path(value), shown=_command_name(ctx),
                                     commands=_config_tables(ctx.find_root().command))
        except DpocliError as err:
            _print_error(err)
            raise typer.Exit(err.exit_code) from None
        ctx.default_map = {**(ctx.default_map or {}), **mapped}
        ctx.meta["dpocli.config"] = (str(value), set(mapped))  # so a bad value can name the file
    return value


def _config_tables(group, prefix: str = "") -> dict:
    """Table name in a --config file -> (the command as typed after `dpo`, the command), for every
    command: a table is named after the command's last word (`[train]`, `[info]`)."""
    tables = {}
    for name, command in getattr(group, "commands", {}).items():
        if getattr(command, "commands", None) is not None:
            tables.update(_config_tables(command, f"{prefix}{name} "))
        else:
            tables[name] = (f"{prefix}{name}", command)
    return tables


def _print_config_callback(ctx: typer.Context, param, value):
    """Eager: print this command's options (with --config values applied) as TOML and exit."""
    if value:
        values = {p.name: (ctx.default_map or {}).get(p.name, p.default) for p in ctx.command.params}
        sys.stdout.write(_options_toml(ctx, values, f"dpo {_command_name(ctx)} options; use with --config"))
        raise typer.Exit(0)
    return value


def _command_name(ctx: typer.Context) -> str:
    """The command as typed after `dpo`: `cache info`, where click's `ctx.info_name` is `info`."""
    names = []
    while ctx.parent is not None:  # the root context is `dpo` itself (or `python -m dpocli`)
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(reversed(names))


def _options_toml(ctx: typer.Context, values: dict, title: str) -> str:
    """Every parameter of the command as TOML, keyed by flag name (unset ones commented out).
    `--print-config` and a run's config.resolved.toml both come from here, so they list the same
    keys, and either one can be given back to `--config`."""
    from dpocli.cli.config_file import to_toml

    values = {p.name: values.get(p.name) for p in ctx.command.params}
    values = {name: str(v) if isinstance(v, Path) else v for name, v in values.items()}
    return to_toml(ctx.command, values, title)


# The eager options every command takes; the others are declared in dpocli/options.py.
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        is_eager=True,
        callback=_config_callback,
        help="TOML file of options (flag names as keys, optionally under [COMMAND]); flags on the "
        "command line win.",
    ),
]
PrintConfigOpt = Annotated[
    bool,
    typer.Option(
        "--print-config",
        is_eager=True,
        callback=_print_config_callback,
        help="Print this command's options as TOML (a --config to start from) and exit.",
    ),
]


def _print_error(err: DpocliError) -> None:
    """`error: <one line>` and an optional `hint:` line, on stderr."""
    from rich.markup import escape  # the line is text: `[train]` or a path with brackets stays as it is
    err_console.print(f"[red]error:[/red] {escape(err.one_line())}", markup=True, highlight=False,
                      soft_wrap=True)
    if err.hint:
        err_console.print(f"hint: {err.hint}", markup=False, highlight=False, soft_wrap=True)


def _run(fn, *, quiet: bool = False, uses_torch: bool = True):
    """Run a driver with stdout shielded, mapping our errors to one line and an exit code.
    `uses_torch=False` (cache info, cache verify, report): skip torch.distributed, whose import alone
    takes seconds, far more than these commands' own work (bench/startup.py measures it)."""
    shutdown = None
    if sys.stdout is None:  # started with stdout closed (`>&-`): the result could go nowhere
        raise typer.Exit(_report(DpocliError(
            "stdout is closed, so the result cannot be written", field="stdout",
            hint="redirect it instead (> result.json, or > /dev/null to discard it)")))
    if uses_torch:
        from dpocli.model import distributed

        is_main = distributed.current().is_main  # initialises torch.distributed under torchrun
        shutdown = distributed.shutdown
    else:
        is_main = os.environ.get("RANK", "0") == "0"  # torchrun's rank, read without torch
    set_quiet(quiet or not is_main)  # one voice per job: rank 0 logs, others stay quiet
    finished = False
    try:
        # A stray print() in a dependency must not corrupt `--json` output on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            result = fn()
        finished = True
        return result
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as err:
        raise typer.Exit(_report(err)) from None
    finally:
        if shutdown is not None:
            shutdown(finished)


def _resolved(ctx: typer.Context) -> str:
    """The command's fully resolved options as TOML (replayable with --config)."""
    return _options_toml(
        ctx,
        ctx.params,
        f"dpo {_command_name(ctx)}, as resolved for this run (dpocli {__version__}); replay with --config",
    )


def _emit(summary: dict, as_json: bool, table_fn) -> None:
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 prints the result
    try:
        if as_json:
            emit_json(summary)
        else:
            emit_table(table_fn(summary))
    except BrokenPipeError:  # the reader went away (`| head`): quietly, with the shell's status
        raise typer.Exit(_report(BrokenPipeError())) from None


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Show the version and exit.")] = False):
    if version:
        sys.stdout.write(f"dpocli {__version__}\n")
        raise typer.Exit(0)


@app.command(
    "precompute-ref",
    epilog=EPILOG + "  Example: dpo precompute-ref prefs.jsonl --model ./sft-model --out ./ref-cache",
)
@with_options
def precompute_ref(
    ctx: typer.Context,
    input: Annotated[
        Path,
        typer.Argument(
            help="A .jsonl or .parquet file, a folder of them, or a Hub dataset id ORG/NAME (read from the "
            "local HF cache; downloaded only when HF_HUB_OFFLINE is unset)."
        ),
    ],
    run: PrecomputeOpts,
    model: ModelOpts,
    layout: LayoutOpts,
    load: LoadOpts,
    output: OutputOpts,
    fmt: OutputFormat,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    """Score every pair with the reference model once and write the Parquet reference cache."""
    from dpocli.cli.tables import precompute_table
    from dpocli.precompute.run import PrecomputeConfig, run_precompute

    cfg = PrecomputeConfig(input=str(input), **config_kwargs(run, model, layout, load, output))
    summary = _run(lambda: run_precompute(cfg, resolved_toml=_resolved(ctx)), quiet=fmt.quiet)
    _emit(summary, fmt.json, precompute_table)


@app.command(
    "train",
    epilog=EPILOG + "  Example: dpo train ./ref-cache --model ./sft-model --out ./run --lr 5e-7 --epochs 1",
)
@with_options
def train(
    ctx: typer.Context,
    cache: Annotated[Path, typer.Argument(help="Reference cache written by precompute-ref.")],
    run: TrainOpts,
    loss: LossOpts,
    optim: OptimOpts,
    model: ModelOpts,
    layout: LayoutOpts,
    load: LoadOpts,
    lora: LoraOpts,
    quant: QuantOpts,
    checkpoints: CheckpointOpts,
    output: OutputOpts,
    fmt: OutputFormat,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    """Train the policy with DPO from the cache alone (the reference model is never loaded)."""
    from dpocli.cli.tables import train_table
    from dpocli.train.loop import TrainConfig, run_train

    groups = (run, loss, optim, model, layout, load, lora, quant, checkpoints, output)
    cfg = TrainConfig(cache=str(cache), **config_kwargs(*groups))
    summary = _run(lambda: run_train(cfg, resolved_toml=_resolved(ctx)), quiet=fmt.quiet)
    _emit(summary, fmt.json, train_table)


@app.command(
    "eval",
    epilog=EPILOG + "  Example: dpo eval ./heldout-cache --model ./run --model './run/checkpoint-*' --json",
)
@with_options
def eval_(
    ctx: typer.Context,
    cache: Annotated[Path, typer.Argument(help="Held-out cache written by precompute-ref.")],
    more_models: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="More models; lets an unquoted shell glob after --model work.", show_default=False
        ),
    ] = None,
    *,
    run: EvalOpts,
    loss: LossOpts,
    load: LoadOpts,
    quant: QuantOpts,
    fmt: OutputFormat,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    """Score checkpoints on a held-out cache: accuracy, margins, displacement, length bias.

    Loss options not given (on the command line or in --config) come from the training run of the
    models when they are dpocli run folders or their checkpoints."""
    from dpocli.cli.tables import eval_table
    from dpocli.eval.evaluate import run_eval

    kwargs = config_kwargs(run, loss, load, quant)
    models = list(kwargs.pop("model") or []) + list(more_models or [])
    summary = _run(
        lambda: run_eval(str(cache), models, loss_given=given(ctx, LossOpts), **kwargs), quiet=fmt.quiet
    )
    _emit(summary, fmt.json, eval_table)


@app.command("report", epilog=EPILOG + "  Example: dpo report ./run --out report.html")
@with_options
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder written by train (its metrics.jsonl), or a metrics.jsonl file.")
    ],
    run: ReportOpts,
    fmt: OutputFormat,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    """Summarise a run's metrics: first/last/min/max and a sparkline per metric; plots with --out."""
    from dpocli.train.report import report_table, summarize

    summary = _run(lambda: summarize(run_dir, run.out), quiet=fmt.quiet, uses_torch=False)
    _emit(summary, fmt.json, report_table)


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

    info = _run(lambda: cache_info_dict(cache), quiet=fmt.quiet, uses_torch=False)
    _emit(info, fmt.json, cache_info_table)


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

    result = _run(lambda: run_verify(str(cache), **config_kwargs(run, load)), quiet=fmt.quiet,
                  uses_torch=run.rescore > 0)
    _emit(result, fmt.json, verify_table)


# ---- the cache as a dataset (issue 26): no torch; dpocli/cache/audit.py and cache_ops.py do the work

CacheArg = Annotated[Path, typer.Argument(help="A cache folder (written by precompute-ref or derived).")]


def _cache_op(fmt, work, table: str) -> None:
    from dpocli.cli import tables as summaries

    _emit(_run(work, quiet=fmt.quiet, uses_torch=False), fmt.json, getattr(summaries, table))


@cache_app.command("audit", epilog=EPILOG + "  Example: dpo cache audit ./ref-cache --out audit.html")
@with_options
def cache_audit(cache: CacheArg, run: AuditOpts, fmt: OutputFormat, config: ConfigOpt = None,
                print_config: PrintConfigOpt = False):
    """Lengths, truncation, identical/duplicate/conflicting pairs and the reference's own margins."""
    from dpocli.cache.audit import run_audit

    _cache_op(fmt, lambda: run_audit(str(cache), **config_kwargs(run)), "audit_table")


@cache_app.command("filter", epilog=EPILOG + "  Example: dpo cache filter ./ref-cache --out ./clean --dedupe")
@with_options
def cache_filter(cache: CacheArg, run: FilterOpts, output: OutputOpts, fmt: OutputFormat,
                 config: ConfigOpt = None, print_config: PrintConfigOpt = False):
    """Write a new cache holding the rows that pass every option given."""
    from dpocli.cache.ops import run_filter

    _cache_op(fmt, lambda: run_filter(str(cache), **config_kwargs(run, output)), "derived_table")


@cache_app.command("split", epilog=EPILOG + "  Example: dpo cache split ./c --out-train ./tr --out-test ./te")
@with_options
def cache_split(cache: CacheArg, run: SplitOpts, output: OutputOpts, fmt: OutputFormat,
                config: ConfigOpt = None, print_config: PrintConfigOpt = False):
    """Split a cache in two by a stable hash of the row id (a held-out cache without a new precompute)."""
    from dpocli.cache.ops import run_split

    _cache_op(fmt, lambda: run_split(str(cache), **config_kwargs(run, output)), "split_table")


@cache_app.command("merge", epilog=EPILOG + "  Example: dpo cache merge ./cache-a ./cache-b --out ./both")
@with_options
def cache_merge(caches: Annotated[list[Path], typer.Argument(help="Two or more caches of one reference.")],
                run: MergeOpts, output: OutputOpts, fmt: OutputFormat, config: ConfigOpt = None,
                print_config: PrintConfigOpt = False):
    """Merge caches made by the same reference, tokenizer and settings; each id is kept once."""
    from dpocli.cache.ops import run_merge

    _cache_op(fmt, lambda: run_merge([str(c) for c in caches], **config_kwargs(run, output)), "derived_table")


def main() -> None:
    interrupt_on_sigterm()  # already done by dpocli.cli.entry; here for callers of dpocli.cli.app:main
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
