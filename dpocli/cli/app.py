"""The `dpo` command: parse flags, call a driver, print the result. No logic of its own.

The stage commands are here (precompute-ref, train, eval, report); `dpo cache ...` is in
cache_commands.py; failures and results go through failures.py; `--config` through
config_options.py. stdout carries results only (a table, or one JSON object with --json);
progress, logs and errors go to stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpocli import __version__
from dpocli.cli import cache_commands  # noqa: F401 (registers `dpo cache ...` on cache_app)
from dpocli.cli.apps import EPILOG, app, cache_app
from dpocli.cli.config_options import ConfigOpt, PrintConfigOpt, resolved_options
from dpocli.cli.failures import emit_result, run_driver
from dpocli.cli.option_params import config_kwargs, given, with_options
from dpocli.eval.options import EvalOpts
from dpocli.io.console import interrupt_on_sigterm
from dpocli.options import (
    CheckpointOpts,
    LayoutOpts,
    LoadOpts,
    LoraOpts,
    LossOpts,
    ModelOpts,
    OptimOpts,
    OutputFormat,
    OutputOpts,
    PrecomputeOpts,
    QuantOpts,
    ReportOpts,
    TrainOpts,
)

__all__ = ["app", "cache_app", "main"]


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
    from dpocli.precompute.config import PrecomputeConfig
    from dpocli.precompute.run import run_precompute

    cfg = PrecomputeConfig(input=str(input), **config_kwargs(run, model, layout, load, output))
    summary = run_driver(lambda: run_precompute(cfg, resolved_toml=resolved_options(ctx)), quiet=fmt.quiet)
    emit_result(summary, fmt.json, precompute_table)


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
    from dpocli.train.config import TrainConfig
    from dpocli.train.loop import run_train

    groups = (run, loss, optim, model, layout, load, lora, quant, checkpoints, output)
    cfg = TrainConfig(cache=str(cache), **config_kwargs(*groups))
    summary = run_driver(lambda: run_train(cfg, resolved_toml=resolved_options(ctx)), quiet=fmt.quiet)
    emit_result(summary, fmt.json, train_table)


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
    from dpocli.eval.config import EvalConfig
    from dpocli.eval.evaluate import run_eval

    kwargs = config_kwargs(run, loss, load, quant)
    models = tuple(kwargs.pop("model") or []) + tuple(more_models or [])
    cfg = EvalConfig(cache=str(cache), models=models, loss_given=given(ctx, LossOpts), **kwargs)
    summary = run_driver(lambda: run_eval(cfg), quiet=fmt.quiet)
    emit_result(summary, fmt.json, eval_table)


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

    summary = run_driver(lambda: summarize(run_dir, run.out), quiet=fmt.quiet, uses_torch=False)
    emit_result(summary, fmt.json, report_table)



def main() -> None:
    interrupt_on_sigterm()  # already done by dpocli.cli.entry; here for callers of dpocli.cli.app:main
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
