"""Runs a plan of `dpo` commands and file operations inside one torchrun launch (tests/torchrun_runs.py).

Started once per world size instead of once per command: each rank imports torch once, then runs
each command in-process as `python -m dpocli` would (dpocli initialises and tears down its process
group per command). A command's stdout and stderr are redirected at the file-descriptor level, so
everything a rank prints (dpocli, libraries, faulthandler) lands in that step's files. After every
step the ranks agree on its exit codes, so a failed command stops the rest of its scenario on
every rank alike.

Each command's process group meets in a store of its own (rank 0 hosts it on a fresh port, as in a
launch of its own): torch names the default group "0" again after it is destroyed, and torchrun's
store would still hold the previous group's addresses under that name, so a rank that arrived
first would connect to a peer's closed port. The worker itself talks through torchrun's store.

    python -m torch.distributed.run --nproc-per-node N ... tests/torchrun_worker.py PLAN.json
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import traceback
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch.distributed as tdist

from dpocli.cli.app import main


def run_command(args: list[str]) -> int:
    """`dpo ARGS` in this process; its exit code."""
    sys.argv = ["dpo", *args]
    try:
        main()
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # noqa: B036 - a crash of the command is its failure, not the worker's
        traceback.print_exc()
        return 1
    return 0


def run_files(op: str, paths: list[str]) -> int:
    if op == "rmtree":
        shutil.rmtree(paths[0])
    elif op == "copytree":
        shutil.copytree(paths[0], paths[1])
    elif op == "unlink":
        Path(paths[0]).unlink()
    else:
        raise ValueError(f"unknown step {op!r}")
    return 0


def captured(fn, out: Path, err: Path) -> int:
    """Call fn() with this process's stdout and stderr (fds 1 and 2) going to two files."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out, "w") as out_file, open(err, "w") as err_file:
        os.dup2(out_file.fileno(), 1)
        os.dup2(err_file.fileno(), 2)
        try:
            return fn()
        except Exception:
            traceback.print_exc()
            return 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class Launch:
    """This rank's link to the other ranks of the launch, through torchrun's store."""

    def __init__(self, timeout_s: float):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                    is_master=False, timeout=timedelta(seconds=timeout_s))

    def fresh_rendezvous(self, serial: int) -> None:
        """The next init_process_group (env://) meets in a new store that rank 0 hosts."""
        key = f"worker/port/{serial}"
        if self.rank == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.store.set(key, str(s.getsockname()[1]))
        os.environ["MASTER_PORT"] = self.store.get(key).decode()
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 hosts the group's store

    def agree(self, serial: int, code: int) -> list[int]:
        """Every rank's exit code for step `serial` (waits for all of them)."""
        self.store.set(f"worker/code/{serial}/{self.rank}", str(code))
        return [int(self.store.get(f"worker/code/{serial}/{r}")) for r in range(self.world)]


def main_worker(plan_path: Path) -> None:
    plan = json.loads(plan_path.read_text())
    launch = Launch(plan["timeout_s"])
    logs, rank = Path(plan["logs"]), launch.rank
    failed = set(plan.get("failed", []))
    for serial, step in enumerate(plan["steps"], start=1):
        if step["scenario"] in failed:
            continue
        stem = logs / step["id"]
        launch.fresh_rendezvous(serial)
        if step["op"] == "dpo":
            code = captured(partial(run_command, step["args"]), Path(f"{stem}.rank{rank}.out"),
                            Path(f"{stem}.rank{rank}.err"))
        elif rank == 0:  # file operations: rank 0 does them, the others wait in agree()
            code = captured(partial(run_files, step["op"], step["args"]), Path(f"{stem}.rank0.out"),
                            Path(f"{stem}.rank0.err"))
        else:
            code = 0
        codes = launch.agree(serial, code)
        if rank == 0:
            Path(f"{stem}.json").write_text(json.dumps({"codes": codes}))
        if any(codes):
            failed.add(step["scenario"])


if __name__ == "__main__":
    main_worker(Path(sys.argv[1]))
