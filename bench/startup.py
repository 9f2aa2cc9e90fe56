"""Start-up time of the commands used in shell pipelines: `dpo cache info`, `dpo cache verify`
(without --rescore), `dpo report` and `dpo --help`, each run as its own process, as a shell runs it.

    python bench/startup.py CACHE RUN [--runs 10] [--json]

CACHE: a cache written by precompute-ref; RUN: a run folder (or metrics.jsonl) written by train.
Prints, per command, the median / min / max wall time and the median CPU time over --runs
processes, and which of torch, transformers and pyarrow it imported (one extra run, see
`imported_heavy`). Two floors frame the figures: the bare interpreter (`python -c pass`) and
`python -c "import torch"`, what every command paid before issue 16.
`python -m dpocli` is what is timed (the `dpo` console script adds only its own wrapper's start).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "pyarrow")

# Runs one command inside a fresh interpreter and reports which heavy modules it imported.
_PROBE = """
import contextlib, io, json, sys
from dpocli.cli.app import app
with contextlib.redirect_stdout(io.StringIO()):
    try:
        app(sys.argv[1:], standalone_mode=False)
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def commands(cache: str, run: str) -> dict[str, list[str]]:
    return {
        "cache info": ["cache", "info", cache, "--json"],
        "cache verify": ["cache", "verify", cache, "--json"],
        "report": ["report", run, "--json"],
    }


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def imported_heavy(args: list[str]) -> list[str]:
    """The modules of HEAVY that running `dpo ARGS` imports (empty for a torch-free command)."""
    probe = _PROBE.format(heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, env=_env(), check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed_runs(args: list[str], runs: int, *, module: bool = True) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of `python -m dpocli ARGS` (or of `python ARGS` with module=False),
    one process per run. CPU time (user + system of the child) is what the command itself costs;
    wall time also counts waiting for a core, which dominates on a loaded machine."""
    walls, cpus = [], []
    for _ in range(runs):
        argv = [sys.executable, *(["-m", "dpocli"] if module else []), *args]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), check=True)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("run")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ns = parser.parse_args()
    # Floors: the interpreter alone, importing torch, and dpocli.cli.app (typer, options) doing nothing.
    runs = {
        "python -c pass": (["-c", "pass"], False),
        "import torch": (["-c", "import torch"], False),
        "dpo --version": (["--version"], True),
        "dpo --help": (["--help"], True),
    }
    runs.update({name: (args, True) for name, args in commands(ns.cache, ns.run).items()})
    summary = {}
    for name, (args, module) in runs.items():
        walls, cpus = timed_runs(args, ns.runs, module=module)
        summary[name] = {
            "wall_median_s": round(statistics.median(walls), 3),
            "wall_min_s": round(min(walls), 3),
            "wall_max_s": round(max(walls), 3),
            "cpu_median_s": round(statistics.median(cpus), 3),
            "runs": ns.runs,
            "imports": imported_heavy(args) if module else [],
        }
    summary["load_average_1min"] = os.getloadavg()[0]
    summary["cpus"] = os.cpu_count()
    if ns.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{'command':<14} {'wall median':>11} {'min':>6} {'max':>6} {'CPU median':>10}  imports of {HEAVY}")
    for name, (_, module) in runs.items():
        r = summary[name]
        imports = (", ".join(r["imports"]) or "none") if module else "-"
        print(
            f"{name:<14} {r['wall_median_s']:>11.3f} {r['wall_min_s']:>6.3f} {r['wall_max_s']:>6.3f} "
            f"{r['cpu_median_s']:>10.3f}  {imports}"
        )
    print(
        f"seconds; {ns.runs} runs each; load average {summary['load_average_1min']:.1f} on "
        f"{summary['cpus']} CPUs"
    )


if __name__ == "__main__":
    main()
