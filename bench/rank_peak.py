"""`python -m dpocli ARGS` that records its own peak resident memory when it exits.

    torchrun --nproc-per-node 2 bench/rank_peak.py precompute-ref ... --fsdp

Each process (each torchrun worker, or the one process) writes the `VmHWM` line of
/proc/self/status, in kB, to `$DPOCLI_PEAK_DIR/rank-$RANK.kb` at exit. `VmHWM` is the peak of
this program alone (unlike `ru_maxrss`, which Linux carries over from the launching parent), and
one file per rank gives every rank's peak, not only the largest. Linux only.
"""

from __future__ import annotations

import atexit
import os
import runpy
from pathlib import Path


def vmhwm_kb() -> int:
    """This process's peak resident set size so far, in kB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def _record() -> None:
    folder = Path(os.environ["DPOCLI_PEAK_DIR"])
    (folder / f"rank-{os.environ.get('RANK', '0')}.kb").write_text(f"{vmhwm_kb()}\n")


if __name__ == "__main__":
    atexit.register(_record)
    runpy.run_module("dpocli", run_name="__main__", alter_sys=True)
