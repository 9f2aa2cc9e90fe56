"""The `dpo` command: parse flags, call a driver, print the result. No logic of its own.

stdout carries results only (a table, or one JSON object with --json); progress, logs and
errors go to stderr. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from dpocli import __version__
from dpocli.console import emit_json, emit_table, err_console, set_quiet
from dpocli.errors import (EXIT_INTERRUPTED, EXIT_RUNTIME, DpocliError, RunFailure,
                           out_of_memory_types)

EPILOG = ("Exit codes: 0 success, 1 runtime failure (NaN loss, out of memory), 2 bad usage or "
          "input, 130 interrupted (state saved). Set DPOCLI_DEBUG=1 for tracebacks.")

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


def _report(err: BaseException) -> int:
    """Print `err` as one line (plus a hint) on stderr; return the exit code."""
    debug = bool(os.environ.get("DPOCLI_DEBUG"))
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
        _print_error(DpocliError(err.format_message().strip().rstrip(".").replace("\n", " "),
                                 file=named, hint=f"see '{ctx.command_path} --help'" if ctx else None))
        return err.exit_code
    if isinstance(err, DpocliError):
        _print_error(err)
        if debug:
            _print_traceback(err)
        return err.exit_code
    if isinstance(err, out_of_memory_types()):
        _print_error(RunFailure("out of memory", hint="lower --batch-size / --max-tokens, or use a "
                                                      "smaller --dtype"))
        return EXIT_RUNTIME
    if isinstance(err, OSError):
        where = err.filename if getattr(err, "filename", None) else None
        _print_error(RunFailure(err.strerror or str(err) or type(err).__name__, file=where))
        return EXIT_RUNTIME
    first_line = str(err).splitlines()[0] if str(err) else ""
    _print_error(RunFailure(f"internal error ({type(err).__name__}: {first_line})",
                            hint="this is a bug in dpocli; rerun with DPOCLI_DEBUG=1 for the traceback "
                                 "and report it"))
    if debug:
        _print_traceback(err)
    return EXIT_RUNTIME


def _print_traceback(err: BaseException) -> None:
    import traceback
    sys.stderr.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))


app = typer.Typer(name="dpo", cls=_OneLineErrors, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False, epilog=EPILOG,
                  help="Direct Preference Optimization in two stages: cache the reference once "
                       "(precompute-ref), then train and evaluate from the cache.")
cache_app = typer.Typer(cls=_OneLineErrors, no_args_is_help=True, help="Inspect and check reference caches.",
                        epilog=EPILOG)
app.add_typer(cache_app, name="cache")

# Options shared by several commands, defined once.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or logs on stderr (errors still shown).")]
DtypeOpt = Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16 or float16.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model's repository.")]
def _config_callback(ctx: typer.Context, param, value):
    """Eager: load the TOML file into click's default_map before other options are resolved."""
    if value:
        from dpocli.config import config_defaults
        try:
            mapped = config_defaults(ctx.command, ctx.info_name, Path(value))
        except DpocliError as err:
            _print_error(err)
            raise typer.Exit(err.exit_code)
        ctx.default_map = {**(ctx.default_map or {}), **mapped}
        ctx.meta["dpocli.config"] = (str(value), set(mapped))  # so a bad value can name the file
    return value


def _print_config_callback(ctx: typer.Context, param, value):
    """Eager: print this command's options (with --config values applied) as TOML and exit."""
    if value:
        from dpocli.config import to_toml
        values = {p.name: (ctx.default_map or {}).get(p.name, p.default) for p in ctx.command.params
                  if not isinstance(p, click.Argument)}
        sys.stdout.write(to_toml(ctx.command, values, f"dpo {ctx.info_name} options; use with --config"))
        raise typer.Exit(0)
    return value


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", is_eager=True, callback=_config_callback, help="TOML file of options (flag names as keys, optionally under [COMMAND]); flags on the command line win.")]
PrintConfigOpt = Annotated[bool, typer.Option("--print-config", is_eager=True, callback=_print_config_callback, help="Print this command's options as TOML (a --config to start from) and exit.")]
AttnOpt = Annotated[Optional[str], typer.Option("--attn-implementation", help="eager, sdpa or flash_attention_2 (default: transformers' choice).")]

# The loss options, shared by train and eval (defaults too: tests/test_cli_loss_options.py checks
# both commands declare the same ones, with TrainConfig's defaults). Names are TRL 1.16's.
BetaOpt = Annotated[float, typer.Option(
    help="β: strength of the pull towards the reference; scales rewards and loss.")]
LossOpt = Annotated[str, typer.Option(
    help="Loss type(s), comma-separated: sigmoid, cdpo, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, "
         "sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft (TRL 1.16's "
         "loss_type; cdpo is dpocli's label-smoothed sigmoid).")]
LossWeightsOpt = Annotated[Optional[str], typer.Option(
    help="Comma-separated weight per loss type (default all 1).")]
LabelSmoothingOpt = Annotated[float, typer.Option(
    help="ε for cdpo, robust, exo_pair (needs > 0), aot, aot_unpaired; refused when no listed loss uses "
         "it (TRL 1.16 ignores it there).")]
IpoSumOpt = Annotated[bool, typer.Option(
    "--ipo-sum", help="IPO on summed log-ratios (paper, OpenRLHF) instead of TRL's per-token average.")]
DiscopopTauOpt = Annotated[float, typer.Option(help="τ of the discopop loss.")]
FDivergenceOpt = Annotated[str, typer.Option(
    help="reverse_kl (DPO), forward_kl, js_divergence or alpha_divergence (TRL's f_divergence_type); only "
         "with sigmoid, cdpo, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft.")]
FAlphaOpt = Annotated[float, typer.Option(help="α of alpha_divergence (TRL's f_alpha_divergence_coef).")]
# CLI parameter -> LossSpec option (see dpocli.losses.LOSS_OPTIONS); --ipo-sum is the negation.
LOSS_PARAMS = {"loss": "loss", "loss_weights": "loss_weights", "beta": "beta",
               "label_smoothing": "label_smoothing", "ipo_sum": "ipo_length_normalized",
               "discopop_tau": "discopop_tau", "f_divergence": "f_divergence", "f_alpha": "f_alpha"}


def _print_error(err: DpocliError) -> None:
    """`error: <one line>` and an optional `hint:` line, on stderr."""
    err_console.print(f"[red]error:[/red] {err.one_line()}", markup=True, highlight=False, soft_wrap=True)
    if err.hint:
        err_console.print(f"hint: {err.hint}", markup=False, highlight=False, soft_wrap=True)


def _run(fn, *, quiet: bool = False):
    """Run a driver with stdout shielded, mapping our errors to one line and an exit code."""
    from dpocli import distributed
    dist = distributed.current()  # initialises torch.distributed under torchrun
    set_quiet(quiet or not dist.is_main)  # one voice per job: rank 0 logs, others stay quiet
    try:
        # A stray print() in a dependency must not corrupt `--json` output on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            return fn()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as err:
        raise typer.Exit(_report(err)) from None
    finally:
        distributed.shutdown()


def _resolved(ctx: typer.Context) -> str:
    """The command's fully resolved options as TOML (replayable with --config)."""
    from dpocli.config import to_toml
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items()}
    return to_toml(ctx.command, values, f"dpo {ctx.info_name}, as resolved for this run "
                                        f"(dpocli {__version__}); replay with --config")


def _emit(summary: dict, as_json: bool, table_fn) -> None:
    import os as _os
    if _os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 prints the result
    if as_json:
        emit_json(summary)
    else:
        emit_table(table_fn(summary))


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Show the version and exit.")] = False):
    if version:
        sys.stdout.write(f"dpocli {__version__}\n")
        raise typer.Exit(0)


@app.command("precompute-ref", epilog=EPILOG + "  Example: dpo precompute-ref prefs.jsonl "
             "--model ./sft-model --out ./ref-cache")
def precompute_ref(
    ctx: typer.Context,
    input: Annotated[Path, typer.Argument(help="A .jsonl or .parquet file, or a folder of them.")],
    model: Annotated[str, typer.Option(help="Reference model: a local folder or a hub id in the local HF cache.")],
    out: Annotated[Path, typer.Option(help="Cache folder to write (created; resumed if unfinished).")],
    max_length: Annotated[int, typer.Option(help="Max tokens of prompt+completion; longer completions are cut at the end (keep_start), rows whose prompt alone fills it are dropped.")] = 1024,
    batch_size: Annotated[Optional[int], typer.Option(help="Pairs per forward pass (length-sorted).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Padded tokens per forward pass, both rows of each pair counted (default 16384).")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = None,
    attn_implementation: AttnOpt = None,
    id_column: Annotated[Optional[str], typer.Option(help="Column with row ids (default: 'id' if present, else a content hash).")] = None,
    prompt_column: Annotated[str, typer.Option(help="Prompt column; if absent the prompt is the common prefix of chosen and rejected.")] = "prompt",
    chosen_column: Annotated[str, typer.Option(help="Preferred completion column.")] = "chosen",
    rejected_column: Annotated[str, typer.Option(help="Dispreferred completion column.")] = "rejected",
    split: Annotated[str, typer.Option(help="Split to read from a folder laid out like a Hub dataset (split-named files, README.md configs, save_to_disk DatasetDict); splits are never merged.")] = "train",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the transformer body (pays on long runs; compiling takes a minute).")] = False,
    prefix_sharing: Annotated[bool, typer.Option("--prefix-sharing", help="Run each pair's prompt once: prompt+chosen+rejected with a prefix-sharing attention pattern (faster with long prompts; without --packing it builds a dense mask and cannot use flash attention).")] = False,
    packing: Annotated[bool, typer.Option("--packing", help="Padding-free batches: all sequences of a batch end to end in one row, attention run per sequence (no compute on pad tokens).")] = False,
    token_logps: Annotated[bool, typer.Option("--token-logps", help="Also store per-token reference log-probs.")] = False,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Under torchrun, shard the reference over the ranks with FSDP2 (forward-only), for a model too large for one device.")] = False,
    weights_fingerprint: Annotated[str, typer.Option(help="How the reference weights are hashed into the cache: full (every byte), sampled (safetensors headers, sizes and 64 blocks per file; for very large models), auto (full up to 16 GiB of weights).")] = "auto",
    rows_per_shard: Annotated[int, typer.Option(help="Input rows per Parquet shard (the unit of resume).")] = 4096,
    drop_identical: Annotated[bool, typer.Option("--drop-identical", help="Drop rows whose chosen equals rejected (default: keep and warn).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail (exit 2) instead of dropping a row whose prompt does not fit --max-length.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing cache made with other arguments.")] = False,
    trust_remote_code: TrustOpt = False,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Score every pair with the reference model once and write the Parquet reference cache."""
    from dpocli.precompute import PrecomputeConfig, run_precompute
    from dpocli.summaries import precompute_table

    cfg = PrecomputeConfig(
        input=str(input), model=model, out=str(out), max_length=max_length, batch_size=batch_size,
        max_tokens=max_tokens, dtype=dtype, device=device, attn_implementation=attn_implementation,
        id_column=id_column, prompt_column=prompt_column, chosen_column=chosen_column,
        rejected_column=rejected_column, token_logps=token_logps, rows_per_shard=rows_per_shard,
        drop_identical=drop_identical, strict=strict, overwrite=overwrite,
        trust_remote_code=trust_remote_code, prefix_sharing=prefix_sharing, packing=packing,
        compile=compile, split=split, fsdp=fsdp, weights_fingerprint=weights_fingerprint)
    _check_dtype(dtype)
    summary = _run(lambda: run_precompute(cfg, resolved_toml=_resolved(ctx)), quiet=quiet)
    _emit(summary, as_json, precompute_table)


@app.command("train", epilog=EPILOG + "  Example: dpo train ./ref-cache --model ./sft-model "
             "--out ./run --lr 5e-7 --epochs 1")
def train(
    ctx: typer.Context,
    cache: Annotated[Path, typer.Argument(help="Reference cache written by precompute-ref.")],
    model: Annotated[str, typer.Option(help="Policy to start from (usually the reference model itself).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, metrics.jsonl, final model.")],
    beta: BetaOpt = 0.1,
    loss: LossOpt = "sigmoid",
    loss_weights: LossWeightsOpt = None,
    label_smoothing: LabelSmoothingOpt = 0.0,
    ipo_sum: IpoSumOpt = False,
    discopop_tau: DiscopopTauOpt = 0.05,
    f_divergence: FDivergenceOpt = "reverse_kl",
    f_alpha: FAlphaOpt = 0.5,
    lr: Annotated[float, typer.Option(help="Peak learning rate (TRL's default 1e-6).")] = 1e-6,
    epochs: Annotated[int, typer.Option(help="Passes over the cache (ignored when --max-steps is given).")] = 1,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps to run; overrides --epochs.")] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per micro-batch per process.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    warmup_ratio: Annotated[float, typer.Option(help="Warm-up as a fraction of all steps (if --warmup-steps is 0).")] = 0.0,
    scheduler: Annotated[str, typer.Option(help="constant, linear or cosine decay after warm-up.")] = "linear",
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases and norms).")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the total gradient norm (0 disables).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for batch order and any randomness.")] = 42,
    dtype: DtypeOpt = "float32",
    autocast: Annotated[Optional[str], typer.Option(help="Mixed precision over fp32 weights: bfloat16 or float16.")] = None,
    device: DeviceOpt = None,
    attn_implementation: AttnOpt = None,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward to save memory.")] = False,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Under torchrun, shard the policy with FSDP2 (per decoder layer) instead of DDP.")] = False,
    lora_r: Annotated[Optional[int], typer.Option(help="Train a LoRA adapter of this rank instead of all weights (needs the optional peft package: pip install 'dpocli\\[lora]').")] = None,
    lora_alpha: Annotated[float, typer.Option(help="LoRA scaling α.")] = 16.0,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA path.")] = 0.0,
    lora_target_modules: Annotated[Optional[str], typer.Option(help="Modules to adapt: comma-separated names or 'all-linear' (default: peft's choice for the architecture, q_proj,v_proj for Llama).")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="With LoRA, also save base + adapter merged to RUN_DIR/merged.")] = False,
    report_to: Annotated[Optional[str], typer.Option(help="Also log to tensorboard and/or wandb (comma-separated; the package must be installed).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the transformer body (pays on long runs; compiling takes a minute).")] = False,
    prefix_sharing: Annotated[bool, typer.Option("--prefix-sharing", help="Run each pair's prompt once: prompt+chosen+rejected with a prefix-sharing attention pattern (faster with long prompts; without --packing it builds a dense mask and cannot use flash attention).")] = False,
    packing: Annotated[bool, typer.Option("--packing", help="Padding-free batches: all sequences of a batch end to end in one row, attention run per sequence (no compute on pad tokens).")] = False,
    no_shuffle: Annotated[bool, typer.Option("--no-shuffle", help="Batches in the input file's row order.")] = False,
    group_by_length: Annotated[bool, typer.Option("--group-by-length", help="Batch pairs of similar length (less padding, random batch order).")] = False,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (always at the end).")] = None,
    save_total_limit: Annotated[Optional[int], typer.Option(help="Keep only the newest N checkpoints.")] = None,
    eval_cache: Annotated[Optional[Path], typer.Option(help="Held-out cache for eval_* metrics.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate every N steps (and at the end).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing --out and start over.")] = False,
    skip_step0_check: Annotated[bool, typer.Option("--skip-step0-check", help="Do not stop when policy = reference fails to reproduce the cache.")] = False,
    keep_dropout: Annotated[bool, typer.Option(
        "--keep-dropout", help="Train with the model's dropout (default: every dropout set to 0, like TRL's "
        "disable_dropout; precompute-ref and eval run the model in eval mode, never with dropout).")] = False,
    allow_tokenizer_mismatch: Annotated[bool, typer.Option("--allow-tokenizer-mismatch", help="Train although the policy's tokenizer differs from the cache's.")] = False,
    trust_remote_code: TrustOpt = False,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train the policy with DPO from the cache alone (the reference model is never loaded)."""
    from dpocli.summaries import train_table
    from dpocli.train import TrainConfig, run_train

    _check_dtype(dtype)
    cfg = TrainConfig(
        cache=str(cache), model=model, out=str(out), beta=beta, loss=loss, loss_weights=loss_weights,
        label_smoothing=label_smoothing, ipo_length_normalized=not ipo_sum, discopop_tau=discopop_tau,
        f_divergence=f_divergence, f_alpha=f_alpha, lr=lr, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, grad_accum=grad_accum, warmup_steps=warmup_steps,
        warmup_ratio=warmup_ratio, scheduler=scheduler, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, seed=seed, dtype=dtype, autocast=autocast, device=device,
        attn_implementation=attn_implementation, gradient_checkpointing=gradient_checkpointing, fsdp=fsdp,
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target_modules=lora_target_modules, merge=merge, report_to=report_to, prefix_sharing=prefix_sharing,
        packing=packing, compile=compile,
        shuffle=not no_shuffle, group_by_length=group_by_length, save_every=save_every,
        save_total_limit=save_total_limit, eval_cache=str(eval_cache) if eval_cache else None,
        eval_every=eval_every, resume=resume, overwrite=overwrite, skip_step0_check=skip_step0_check,
        keep_dropout=keep_dropout,
        allow_tokenizer_mismatch=allow_tokenizer_mismatch, trust_remote_code=trust_remote_code)
    summary = _run(lambda: run_train(cfg, resolved_toml=_resolved(ctx)), quiet=quiet)
    _emit(summary, as_json, train_table)


@app.command("eval", epilog=EPILOG + "  Example: dpo eval ./heldout-cache --model ./run "
             "--model './run/checkpoint-*' --json")
def eval_(
    ctx: typer.Context,
    cache: Annotated[Path, typer.Argument(help="Held-out cache written by precompute-ref.")],
    more_models: Annotated[Optional[list[str]], typer.Argument(help="More models; lets an unquoted shell glob after --model work.", show_default=False)] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="Model folder to score (repeatable; quoted globs like 'run/checkpoint-*' expand in step order).")] = None,
    beta: BetaOpt = 0.1,
    loss: LossOpt = "sigmoid",
    loss_weights: LossWeightsOpt = None,
    label_smoothing: LabelSmoothingOpt = 0.0,
    ipo_sum: IpoSumOpt = False,
    discopop_tau: DiscopopTauOpt = 0.05,
    f_divergence: FDivergenceOpt = "reverse_kl",
    f_alpha: FAlphaOpt = 0.5,
    max_tokens: Annotated[Optional[int], typer.Option(help="Padded tokens per forward (default: the cache's precompute batching, which reproduces it exactly).")] = None,
    # Default None = the cache's: scoring the reference in other numerics is not exactly neutral.
    dtype: Annotated[Optional[str], typer.Option(help="Weights dtype: float32, bfloat16 or float16 (default: the cache's; another value warns).")] = None,
    device: DeviceOpt = None,
    attn_implementation: Annotated[Optional[str], typer.Option("--attn-implementation", help="eager, sdpa or flash_attention_2 (default: the cache's; another value warns).")] = None,
    per_example: Annotated[Optional[Path], typer.Option(help="Write one row per (model, pair) to this .parquet or .jsonl file.")] = None,
    samples: Annotated[int, typer.Option(help="Generate completions for the first N held-out prompts.")] = 0,
    ref_model: Annotated[Optional[str], typer.Option(help="Reference model for side-by-side samples and a sampled KL(policy||reference) estimate.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length for --samples.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy samples; KL always samples at 1.")] = 0.0,
    kl_samples: Annotated[int, typer.Option(help="Policy samples per prompt for the KL estimate.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    trust_remote_code: TrustOpt = False,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Score checkpoints on a held-out cache: accuracy, margins, displacement, length bias.

    Loss options not given (on the command line or in --config) come from the training run of the
    models when they are dpocli run folders or their checkpoints."""
    from dpocli.evaluate import run_eval
    from dpocli.summaries import eval_table

    if dtype is not None:
        _check_dtype(dtype)
    models = list(model or []) + list(more_models or [])
    # Given = on the command line or in --config. By name: typer may bring its own copy of click's enum.
    given = frozenset(option for param, option in LOSS_PARAMS.items()
                      if getattr(ctx.get_parameter_source(param), "name", "DEFAULT") != "DEFAULT")
    summary = _run(lambda: run_eval(
        str(cache), models, beta=beta, loss=loss, loss_weights=loss_weights,
        label_smoothing=label_smoothing, ipo_length_normalized=not ipo_sum, discopop_tau=discopop_tau,
        f_divergence=f_divergence, f_alpha=f_alpha, loss_given=given, max_tokens=max_tokens,
        dtype=dtype, device=device, per_example=str(per_example) if per_example else None,
        samples=samples, ref_model=ref_model, max_new_tokens=max_new_tokens, temperature=temperature,
        kl_samples=kl_samples, seed=seed, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code), quiet=quiet)
    _emit(summary, as_json, eval_table)


@app.command("report", epilog=EPILOG + "  Example: dpo report ./run --out report.html")
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by train (its metrics.jsonl), or a metrics.jsonl file.")],
    out: Annotated[Optional[Path], typer.Option(help="Also draw the curves to a .png, or a self-contained .html page (needs matplotlib, the 'report' extra).")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Summarise a run's metrics: first/last/min/max and a sparkline per metric; plots with --out."""
    from dpocli.report import report_table, summarize

    summary = _run(lambda: summarize(run_dir, out), quiet=quiet)
    _emit(summary, as_json, report_table)


@cache_app.command("info", epilog=EPILOG)
def cache_info(
    cache: Annotated[Path, typer.Argument(help="A cache folder written by precompute-ref.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Manifest summary: what produced the cache, row counts, dropped rows by reason, lengths."""
    from dpocli.summaries import cache_info_dict, cache_info_table

    info = _run(lambda: cache_info_dict(cache))
    _emit(info, as_json, cache_info_table)


@cache_app.command("verify", epilog=EPILOG)
def cache_verify(
    cache: Annotated[Path, typer.Argument(help="A cache folder written by precompute-ref.")],
    rescore: Annotated[int, typer.Option(help="Re-score N random rows with the reference model and compare.")] = 0,
    model: Annotated[Optional[str], typer.Option(help="Reference model to re-score with (default: the path in the manifest; its weights must match the manifest's sha256).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for choosing the rows to re-score.")] = 0,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Recompute shard checksums, check values are finite, and optionally re-score rows."""
    from dpocli.summaries import verify_table
    from dpocli.verify import run_verify

    result = _run(lambda: run_verify(str(cache), rescore=rescore, model=model, seed=seed,
                                     device=device), quiet=quiet)
    _emit(result, as_json, verify_table)


def _check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "bfloat16", "float16"):
        err_console.print(f"[red]error:[/red] option '--dtype': {dtype!r} is not one of float32, "
                          "bfloat16, float16")
        raise typer.Exit(2)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
