"""The commands used in shell pipelines (`cache info`, `cache verify` without --rescore, `report`),
and `--help`, `--version` and `--print-config`, import neither torch nor transformers (issue 16).
Those that read no Parquet (all but `cache verify`) import no pyarrow either.

The commands run in a fresh interpreter (this one has torch loaded already), one after another:
after each, the probe prints its exit code and the watched modules imported *so far*. The commands
that may import least run first (sorted by how much they ban), so a module any of them imported is
still seen by the check of every later command that bans it: one interpreter checks what fourteen
did, at least as strictly. The second interpreter shows that the probe can see torch.
Timings are not asserted here (2 shared cores): `bench/startup.py` measures them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, write_jsonl

WATCHED = ("torch", "transformers", "pyarrow", "numpy")
MARK = "probe-result: "
PROBE = """
import json, sys
from dpocli.cli.app import main
for args in json.loads(sys.argv[1]):
    sys.argv = ["dpo", *args]
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code
    sys.stdout.flush()
    print("\\n" + %r + json.dumps({"code": code, "imported": [m for m in %r if m in sys.modules]}), flush=True)
""" % (MARK, WATCHED)

MODELS = {"torch", "transformers"}
PARQUET = {"pyarrow", "numpy"}


def run_probe(commands: list[list]) -> list[dict]:
    """Each command's result, in order, from one interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = json.dumps([[str(a) for a in args] for args in commands])
    done = subprocess.run([sys.executable, "-c", PROBE, argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    found = [json.loads(line[len(MARK):]) for line in done.stdout.splitlines() if line.startswith(MARK)]
    assert len(found) == len(commands), done.stdout
    return found


CASES = [  # (dpo's arguments, exit code, modules it must not import)
    (["cache", "info", "CACHE"], 0, MODELS | PARQUET),
    (["cache", "info", "CACHE", "--json"], 0, MODELS | PARQUET),
    (["cache", "info", "MISSING"], 2, MODELS | PARQUET),
    (["cache", "verify", "CACHE", "--json"], 0, MODELS),  # reads every shard: needs pyarrow
    # The cache as a dataset (issue 26): Parquet, never a model.
    (["cache", "audit", "CACHE", "--json"], 0, MODELS),
    (["cache", "filter", "CACHE", "--out", "OUT", "--dedupe", "--json"], 0, MODELS),
    (["cache", "split", "CACHE", "--out-train", "OUT2", "--out-test", "OUT3", "--json"], 0, MODELS),
    (["cache", "merge", "CACHE", "CACHE", "--out", "OUT4", "--json"], 0, MODELS),
    (["cache", "filter", "--print-config"], 0, MODELS | PARQUET),
    (["report", "METRICS"], 0, MODELS | PARQUET),
    (["report", "METRICS", "--json"], 0, MODELS | PARQUET),
    (["--help"], 0, MODELS | PARQUET),
    (["--version"], 0, MODELS | PARQUET),
    (["train", "--help"], 0, MODELS | PARQUET),
    (["cache", "info", "--print-config"], 0, MODELS | PARQUET),
    (["cache", "verify", "--print-config"], 0, MODELS | PARQUET),
    (["train", "--print-config"], 0, MODELS | PARQUET),
    (["precompute-ref", "--print-config"], 0, MODELS | PARQUET),
]


@pytest.fixture(scope="module")
def light_results(small_cache, tmp_path_factory) -> dict:
    """Every case's result, keyed by its command, from one probe interpreter (strictest first)."""
    tmp_path = tmp_path_factory.mktemp("startup")
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.5}])
    paths = {"CACHE": small_cache, "METRICS": metrics, "MISSING": tmp_path / "no-cache",
             "OUT": tmp_path / "out", "OUT2": tmp_path / "out2", "OUT3": tmp_path / "out3",
             "OUT4": tmp_path / "out4"}
    ordered = sorted(CASES, key=lambda case: -len(case[2]))
    found = run_probe([[paths.get(a, a) for a in command] for command, _, _ in ordered])
    return {" ".join(command): result for (command, _, _), result in zip(ordered, found, strict=True)}


@pytest.mark.parametrize("command, exit_code, banned", [pytest.param(*c, id=" ".join(c[0])) for c in CASES])
def test_light_commands_do_not_import_torch(light_results, command, exit_code, banned):
    found = light_results[" ".join(command)]
    assert found["code"] == exit_code
    assert not set(found["imported"]) & banned, found["imported"]


def test_the_probe_sees_torch_when_a_command_imports_it(small_cache):
    """The check above can fail: a command that loads a model (here, re-scoring) shows up."""
    [found] = run_probe([["cache", "verify", small_cache, "--rescore", "1", "--device", "cpu", "--json"]])
    assert found["code"] == 0
    assert {"torch", "transformers"} <= set(found["imported"])
