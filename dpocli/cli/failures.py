"""What a command's end looks like to the user: one `error:` line and an exit code for every
failure (never a traceback unless DPOCLI_DEBUG is set), results on stdout, nothing else there.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 130 interrupted (Ctrl-C or SIGTERM,
any command), 141 the reader of stdout went away (`| head`), quietly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import typer

from dpocli.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    DpocliError,
    RunFailure,
    is_out_of_memory,
)
from dpocli.io.console import emit_json, emit_table, err_console, set_quiet


def is_click_error(err: BaseException, name: str = "ClickException") -> bool:
    # typer >= 0.29 vendors click (typer._click), older typer uses click itself: match by class name.
    return any(cls.__name__ == name for cls in type(err).__mro__)


class OneLineErrors(typer.core.TyperGroup):
    """Every failure reaches the user as one `error:` line and an exit code, never a traceback:
    click's usage errors (2), our DpocliError (2, or 1 at run time), anything else (1, a bug)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as err:  # typer.Exit never gets here: non-standalone click returns its code
            code = report_failure(err)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        """Ctrl-C / SIGTERM outside `run_driver` (a command's own imports): typer would exit 130 silently."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None


def report_failure(err: BaseException) -> int:
    """Print `err` as one line (plus a hint) on stderr; return the exit code."""
    debug = bool(os.environ.get("DPOCLI_DEBUG"))
    if isinstance(err, BrokenPipeError):  # `dpo ... | head`: the reader has all it wanted
        discard_stdout()
        return EXIT_BROKEN_PIPE
    if is_click_error(err, "NoArgsIsHelpError"):
        sys.stdout.write(err.format_message() + "\n")  # the help text itself
        return 0
    if is_click_error(err, "Abort"):
        err_console.print("interrupted")
        return EXIT_INTERRUPTED
    if is_click_error(err):
        ctx, param = getattr(err, "ctx", None), getattr(err, "param", None)
        config_file, from_config = (ctx.meta.get("dpocli.config") if ctx else None) or (None, ())
        named = config_file if param is not None and param.name in from_config else None
        print_error(
            DpocliError(
                err.format_message().strip().rstrip(".").replace("\n", " "),
                file=named,
                hint=f"see '{ctx.command_path} --help'" if ctx else None,
            )
        )
        return err.exit_code
    if isinstance(err, DpocliError):
        print_error(err)
        if debug:
            print_traceback(err)
        return err.exit_code
    if is_out_of_memory(err):
        print_error(
            RunFailure("out of memory", hint="lower --batch-size / --max-tokens, or use a smaller --dtype")
        )
        return EXIT_RUNTIME
    if isinstance(err, RecursionError):
        # dpocli recurses only over what it reads (JSON, TOML, templates), and the readers it knows
        # refuse deep nesting naming file and row; one it does not know ends here, still as input.
        print_error(DpocliError("a file this command reads nests lists or objects too deeply to read",
                                 hint="rerun with DPOCLI_DEBUG=1 to see which file"))
        if debug:
            print_traceback(err)
        return EXIT_USAGE
    if isinstance(err, OSError):
        where = err.filename if getattr(err, "filename", None) else None
        print_error(RunFailure(err.strerror or str(err) or type(err).__name__, file=where))
        return EXIT_RUNTIME
    first_line = str(err).splitlines()[0] if str(err) else ""
    print_error(
        RunFailure(
            f"internal error ({type(err).__name__}: {first_line})",
            hint="this is a bug in dpocli; rerun with DPOCLI_DEBUG=1 for the traceback and report it",
        )
    )
    if debug:
        print_traceback(err)
    return EXIT_RUNTIME


def discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still buffered
    does not fail again on the closed pipe (Python's documented recipe for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def print_traceback(err: BaseException) -> None:

    sys.stderr.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))




def print_error(err: DpocliError) -> None:
    """`error: <one line>` and an optional `hint:` line, on stderr."""
    from rich.markup import escape  # the line is text: `[train]` or a path with brackets stays as it is
    err_console.print(f"[red]error:[/red] {escape(err.one_line())}", markup=True, highlight=False,
                      soft_wrap=True)
    if err.hint:
        err_console.print(f"hint: {err.hint}", markup=False, highlight=False, soft_wrap=True)


def run_driver(fn, *, quiet: bool = False, uses_torch: bool = True):
    """Run a driver with stdout shielded, mapping our errors to one line and an exit code.
    `uses_torch=False` (cache info, cache verify, report): skip torch.distributed, whose import alone
    takes seconds, far more than these commands' own work (bench/startup.py measures it)."""
    shutdown = None
    if sys.stdout is None:  # started with stdout closed (`>&-`): the result could go nowhere
        raise typer.Exit(report_failure(DpocliError(
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
        raise typer.Exit(report_failure(err)) from None
    finally:
        if shutdown is not None:
            shutdown(finished)




def emit_result(summary: dict, as_json: bool, table_fn) -> None:
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 prints the result
    try:
        if as_json:
            emit_json(summary)
        else:
            emit_table(table_fn(summary))
    except BrokenPipeError:  # the reader went away (`| head`): quietly, with the shell's status
        raise typer.Exit(report_failure(BrokenPipeError())) from None

