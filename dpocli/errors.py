"""Errors that reach the user as one line, and the exit codes they map to.

Every failure the user can fix (bad input, bad flags, an incompatible cache) is a `DpocliError`
with exit code 2; failures at run time (NaN loss, out of memory) are `RunFailure` with exit code 1.
The CLI catches `DpocliError` only, so a real bug still shows its traceback.
"""

from __future__ import annotations

import errno
import os
import sys

EXIT_RUNTIME = 1
EXIT_USAGE = 2  # click's own code for usage errors, so typer's errors and ours agree
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


class DpocliError(Exception):
    """A problem the user can fix. `str(err)` is one line naming file, row and field when known.

    Args:
        message: what is wrong, e.g. "is empty (expected a non-empty string)".
        file: the input file or folder involved.
        row: 1-based line (JSONL) or row (Parquet) number in `file`.
        field: the column or manifest field involved.
        hint: what to do about it; shown on a second line by the CLI.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, file=None, row: int | None = None,
                 field: str | None = None, hint: str | None = None):
        self.message = message
        self.file = None if file is None else str(file)
        self.row = row
        self.field = field
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file + (f":{self.row}" if self.row is not None else "") + ": "
        elif self.row is not None:
            where = f"row {self.row}: "
        what = f"field '{self.field}' " if self.field else ""
        return (where + what + self.message).replace("\n", " ")


class UnusableRow(DpocliError):
    """A row dpocli cannot score as its data means (an empty prompt, a message the chat template
    leaves out, ...). `reason` names the class; precompute skips and counts such rows by reason,
    or with --strict reports this error."""

    def __init__(self, reason: str, message: str, **where):
        super().__init__(message, **where)
        self.reason = reason


class RunFailure(DpocliError):
    """A failure at run time (NaN/inf loss, out of memory); the message says what to change."""

    exit_code = EXIT_RUNTIME


class Interrupted(DpocliError):
    """Ctrl-C / SIGTERM after resumable state was written; the message says how to resume."""

    exit_code = EXIT_INTERRUPTED


MAX_SEED = 2**32 - 1  # numpy's limit, which HF's set_seed (and so TRL) also has


def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise DpocliError(f"must be between 0 and {MAX_SEED}, got {seed}", field=flag)


def check_at_least(values: dict, minimum: float) -> None:
    """Refuse any `flag: value` below `minimum` (None means unset and passes)."""
    for flag, value in values.items():
        if value is not None and not value >= minimum:
            raise DpocliError(f"must be >= {minimum}, got {value}", field=flag)


def check_torchrun_launch(fsdp: bool, command: str) -> None:
    """--fsdp needs torch.distributed, which only a torchrun launch sets up (RANK in the
    environment); one process under torchrun is fine, which is how a sharded run resumes on one device."""
    if fsdp and "RANK" not in os.environ:
        raise DpocliError("needs a torchrun launch (1 process is fine: that is how a sharded run "
                          "resumes on one device)", field="--fsdp",
                          hint=f"torchrun --nproc-per-node N $(which dpo) {command} ... --fsdp")


def out_of_memory_types() -> tuple[type, ...]:
    if "torch" not in sys.modules:  # no torch, no torch OOM; and torch-free commands stay torch-free
        return (MemoryError,)
    import torch
    return tuple({getattr(torch, "OutOfMemoryError", MemoryError), torch.cuda.OutOfMemoryError,
                  MemoryError})


def is_out_of_memory(err: BaseException) -> bool:
    """Out of memory in any of its shapes: MemoryError and torch's OOM, and an address-space limit
    (`ulimit -v`) hit in the OS (ENOMEM) or while loading a shared library (ImportError "failed to
    map segment from shared object")."""
    if isinstance(err, out_of_memory_types()):
        return True
    if isinstance(err, OSError) and err.errno == errno.ENOMEM:
        return True
    text = str(err)
    return isinstance(err, (ImportError, OSError)) and (
        "failed to map segment" in text or "Cannot allocate memory" in text)
