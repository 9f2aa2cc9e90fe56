"""torchrun scenarios, launched once per world size for the whole session instead of once per command.

Every torchrun launch starts an agent and one interpreter per rank, and each imports torch (seconds
of CPU before any work). A test that needs multi-rank runs declares a *scenario*: a function that
prepares inputs in its folder and returns the steps (`dpo` commands on 1 or 2 ranks, and the file
operations between them) that the test used to run one launch at a time. The session fixture
collects the scenarios of the selected tests, runs all their steps in at most three launches
(1 rank, then 2 ranks, then 1 rank again: a scenario's steps keep their order), and each test then
asserts on its scenario's folders and on each command's exit code, stdout and stderr, as before.

    @scenario
    def fsdp_eval(folder, small_cache):        # parameters after `folder`: session fixtures
        return [dpo("eval", "eval", small_cache, ..., ranks=2)]

    @pytest.mark.torchrun("fsdp_eval")
    def test_it(torchrun_scenario):
        done = torchrun_scenario["eval"]         # .returncode, .stdout, .stderr (all ranks)

tests/torchrun_worker.py runs the steps inside a launch.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "torchrun_worker.py"
LAUNCHES = (1, 2, 1)  # ranks per launch; a scenario's 1-rank steps after a 2-rank step go last
TIMEOUT_S = 3600  # one launch runs the commands of many tests (each had 600 s)
SCENARIOS: dict = {}


@dataclass
class Step:
    op: str  # "dpo", "rmtree", "copytree", "unlink"
    args: list
    ranks: int | None = None  # dpo steps only; file operations run in their neighbour's launch
    name: str | None = None


@dataclass
class Done:
    """What subprocess.run returned for one `torchrun ... -m dpocli ARGS` before: the exit code
    (non-zero when any rank failed) and every rank's stdout and stderr, in rank order."""
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Scenario:
    folder: Path
    results: dict

    def __getitem__(self, name: str) -> Done:
        return self.results[name]


def scenario(fn):
    """Register a scenario under its function's name (unique over the test files)."""
    assert fn.__name__ not in SCENARIOS, f"two torchrun scenarios named {fn.__name__}"
    SCENARIOS[fn.__name__] = fn
    return fn


def dpo(name: str, *args, ranks: int = 2) -> Step:
    return Step("dpo", [str(a) for a in args], ranks, name)


def rmtree(path) -> Step:
    return Step("rmtree", [str(path)])


def copytree(src, dst) -> Step:
    return Step("copytree", [str(src), str(dst)])


def unlink(path) -> Step:
    return Step("unlink", [str(path)])


def launch_of(steps: list[Step]) -> list[int]:
    """Index into LAUNCHES of each step: 1-rank commands before the first 2-rank one run in the
    first launch, those after it in the last; a file operation goes with the next command."""
    launches, state = [], 0
    for step in steps:
        if step.ranks == 2:
            assert state < 2, "a 2-rank step after a 1-rank step that follows a 2-rank step"
            state = 1
        elif step.ranks == 1 and state >= 1:
            state = 2
        launches.append(state if step.ranks is not None else None)
    following = None
    for i in reversed(range(len(steps))):
        following = launches[i] if launches[i] is not None else following
        launches[i] = following
    last = next((x for x in reversed(launches) if x is not None), 0)
    return [last if x is None else x for x in launches]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(plan_path: Path, nproc: int) -> tuple[int, str]:
    """One torchrun launch of the worker; (exit code, its own output's tail). The whole output is
    kept beside the plan (plan-N.log)."""
    # faulthandler: a rank that dies in native code (SIGABRT, SIGSEGV) prints its Python stack.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(WORKER), str(plan_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and its ranks
        output, _ = proc.communicate()
        output += f"\ntorchrun launch timed out after {TIMEOUT_S} s"
    plan_path.with_suffix(".log").write_text(output)
    return proc.returncode, output[-3000:]


def _read(stem: Path, nproc: int, suffix: str) -> str:
    return "".join(p.read_text() for r in range(nproc) if (p := Path(f"{stem}.rank{r}.{suffix}")).exists())


def run_scenarios(names: list[str], root: Path, fixture) -> dict[str, Scenario]:
    """Prepare each scenario, run all their steps in at most len(LAUNCHES) launches, collect."""
    logs = root / "logs"
    logs.mkdir()
    plans = {}
    for name in names:
        fn, folder = SCENARIOS[name], root / name
        folder.mkdir()
        inputs = {p: fixture(p) for p in list(inspect.signature(fn).parameters)[1:]}
        steps = fn(folder, **inputs)
        plans[name] = list(zip(launch_of(steps), steps, strict=True))
    results = {name: {} for name in names}
    failure: dict[str, str] = {}  # scenario -> why its remaining steps did not run
    for launch, nproc in enumerate(LAUNCHES):
        todo = [(name, f"{name}-{i:02d}-{step.name or step.op}", step)
                for name in names for i, (where, step) in enumerate(plans[name]) if where == launch]
        todo = [t for t in todo if t[0] not in failure]
        if not todo:
            continue
        plan = root / f"plan-{launch}.json"
        plan.write_text(json.dumps({"logs": str(logs), "timeout_s": TIMEOUT_S, "steps": [
            {"scenario": name, "id": sid, "op": step.op, "args": step.args} for name, sid, step in todo]}))
        code, output = _launch(plan, nproc)
        for name, sid, step in todo:
            if name in failure:
                continue
            stem = logs / sid
            record = Path(f"{stem}.json")
            if not record.exists():
                failure[name] = f"torchrun launch of {plan.name} exited {code} before step {sid}:\n{output}"
                continue
            codes = json.loads(record.read_text())["codes"]
            rc = next((c for c in codes if c), 0)
            done = Done(rc, _read(stem, nproc, "out"), _read(stem, nproc, "err"))
            if step.name:
                results[name][step.name] = done
            if rc:
                failure[name] = f"step {sid} exited {codes}:\n{done.stderr[-3000:]}"
    for name in names:
        for _, step in plans[name]:
            if step.name and step.name not in results[name]:
                results[name][step.name] = Done(-1, "", f"not run: {failure.get(name)}")
    return {name: Scenario(root / name, results[name]) for name in names}


@pytest.fixture(scope="session")
def torchrun_runs(request, tmp_path_factory) -> dict[str, Scenario]:
    """Every scenario named by a `torchrun` marker on a selected test, run once for the session."""
    names = sorted({m.args[0] for item in request.session.items for m in item.iter_markers("torchrun")})
    return run_scenarios(names, tmp_path_factory.mktemp("torchrun"), request.getfixturevalue)


@pytest.fixture
def torchrun_scenario(request, torchrun_runs) -> Scenario:
    """The scenario named by this test's `torchrun` marker."""
    return torchrun_runs[request.node.get_closest_marker("torchrun").args[0]]
