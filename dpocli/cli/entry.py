"""The `dpo` process entry: what must hold before the CLI itself is importable.

* SIGTERM raises KeyboardInterrupt from the first line on, so every command (eval and report
  included, at any point, imports too) ends as Ctrl-C does: `interrupted`, exit 130, after train
  and precompute-ref saved what they had (they catch it in their loops).
* An address-space limit (`ulimit -v`) can be hit while Python imports typer, rich or torch:
  that is the documented `error: out of memory` line and exit 1, never a traceback, and the line
  is written with a bare os.write (printing anything richer may itself need memory).
"""

from __future__ import annotations

import os
import sys

from dpocli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, is_out_of_memory
from dpocli.io.console import interrupt_on_sigterm

OUT_OF_MEMORY = (b"error: out of memory\n"
                 b"hint: lower --batch-size / --max-tokens, or use a smaller --dtype; under `ulimit -v` "
                 b"allow more address space (torch alone maps about 1 GB)\n")


def main() -> None:
    interrupt_on_sigterm()
    try:
        # Imported here, not at the top: this import is what may run out of memory or be interrupted.
        from dpocli.cli.app import main as cli_main
        cli_main()
    except KeyboardInterrupt:
        _write_stderr(b"interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:  # only what escaped the CLI's own one-line errors (a failed import)
        if not is_out_of_memory(err):
            raise
        _write_stderr(OUT_OF_MEMORY)
        sys.exit(EXIT_RUNTIME)


def _write_stderr(data: bytes) -> None:
    try:
        os.write(2, data)
    except OSError:
        pass  # stderr is closed: the exit code alone has to tell
