"""Where output goes: results to stdout, everything else (progress, logs, warnings) to stderr.

A pipeline like `dpo eval CACHE --model M --json | jq` must see exactly one JSON object on stdout,
so nothing in this package prints to stdout except `emit_json` / `emit_table`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import sys
import threading
import time


@functools.cache
def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


class _StderrConsole:
    """rich's Console on stderr, made at its first use. Importing rich.console costs about 0.09 s
    of CPU, a sixth of `dpo cache info --json`; a `--json` command with nothing to say on stderr
    never pays for it (bench/RESULTS.md, "Start-up")."""

    def __getattr__(self, name):
        return getattr(_stderr_console(), name)


err_console = _StderrConsole()
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """An informational line on stderr (silenced by --quiet)."""
    if not _quiet:
        err_console.print(message)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet because it may change how results are read.
    `message` is text, never markup (a path or a TOML table name `[train]` is shown as it is)."""
    from rich.markup import escape
    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}")


def _json_default(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def clean_floats(obj):
    """NaN/inf are not JSON; write them as null so `jq` and json.loads accept the output."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_floats(v) for v in obj]
    return obj


def emit_json(obj) -> None:
    """The single result object of a command, on stdout."""
    sys.stdout.write(json.dumps(clean_floats(obj), sort_keys=False, default=_json_default) + "\n")
    sys.stdout.flush()


def emit_table(table) -> None:
    """A human-readable result (rich renderable) on stdout."""
    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False)
    console.on_broken_pipe = _broken_pipe  # rich's own would exit 1; the CLI maps it (141)
    console.print(table)
    sys.stdout.flush()  # a closed pipe fails here, where the CLI maps it, not at interpreter exit


def _broken_pipe():
    raise BrokenPipeError


class ProgressBar:
    """A rich progress bar on stderr; a plain line every few seconds when stderr is not a terminal.

    `update(advance, **fields)` adds to the count; `fields` (e.g. tokens/s, loss) are shown after the bar.
    """

    def __init__(self, description: str, total: int | None, *, every_s: float = 10.0):
        self.description = description
        self.total = total
        self.done = 0
        self.fields: dict = {}
        self._animated = err_console.is_terminal and not _quiet
        self._every_s = every_s
        self._last_line = time.monotonic()
        self._progress = None
        if self._animated:
            # Imported here: commands that never show a bar (cache info, report) skip its import.
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=_stderr_console(), transient=True)
            self._task = self._progress.add_task(description, total=total, info="")

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False

    def update(self, advance: int = 1, **fields) -> None:
        self.done += advance
        self.fields.update(fields)
        info = "  ".join(f"{k} {v}" for k, v in self.fields.items())
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, info=info)
        elif not _quiet and time.monotonic() - self._last_line >= self._every_s:
            self._last_line = time.monotonic()
            total = f"/{self.total}" if self.total else ""
            err_console.print(f"{self.description}: {self.done}{total}  {info}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """For the whole process (the CLI entry): SIGTERM takes Ctrl-C's path, KeyboardInterrupt."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's pre-emption, `kill`) takes Ctrl-C's path inside the block: the
    driver saves what it has and exits 130 with a resume hint, instead of dying mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
