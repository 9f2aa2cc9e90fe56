"""The commands used in shell pipelines (`cache info`, `cache verify` without --rescore, `report`),
and `--help`, `--version` and `--print-config`, import neither torch nor transformers (issue 16).
Those that read no Parquet (all but `cache verify`) import no pyarrow either.

Each command runs in a fresh interpreter (this one has torch loaded already); its exit code and the
watched modules it imported are printed on the last line.
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
PROBE = """
import json, sys
from dpocli.cli import main
sys.argv = ["dpo", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "imported": [m for m in %r if m in sys.modules]}))
""" % (WATCHED,)

MODELS = {"torch", "transformers"}
PARQUET = {"pyarrow", "numpy"}


def run_probe(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = [  # (dpo's arguments, exit code, modules it must not import)
    (["cache", "info", "CACHE"], 0, MODELS | PARQUET),
    (["cache", "info", "CACHE", "--json"], 0, MODELS | PARQUET),
    (["cache", "info", "MISSING"], 2, MODELS | PARQUET),
    (["cache", "verify", "CACHE", "--json"], 0, MODELS),  # reads every shard: needs pyarrow
    # The cache as a dataset (issue 26): Parquet, never a model.
    (["cache", "audit", "CACHE", "--json"], 0, MODELS),
    (["cache", "filter", "CACHE", "--out", "OUT", "--dedupe", "--json"], 0, MODELS),
    (["cache", "split", "CACHE", "--out-train", "OUT", "--out-test", "OUT2", "--json"], 0, MODELS),
    (["cache", "merge", "CACHE", "CACHE", "--out", "OUT", "--json"], 0, MODELS),
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


@pytest.mark.parametrize("command, exit_code, banned", [pytest.param(*c, id=" ".join(c[0])) for c in CASES])
def test_light_commands_do_not_import_torch(small_cache, tmp_path, command, exit_code, banned):
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.5}])
    paths = {"CACHE": small_cache, "METRICS": metrics, "MISSING": tmp_path / "no-cache", "OUT": tmp_path / "out",
             "OUT2": tmp_path / "out2"}
    found = run_probe([paths.get(a, a) for a in command])
    assert found["code"] == exit_code
    assert not set(found["imported"]) & banned, found["imported"]


def test_the_probe_sees_torch_when_a_command_imports_it(small_cache):
    """The check above can fail: a command that loads a model (here, re-scoring) shows up."""
    found = run_probe(["cache", "verify", small_cache, "--rescore", "1", "--device", "cpu", "--json"])
    assert found["code"] == 0
    assert {"torch", "transformers"} <= set(found["imported"])
