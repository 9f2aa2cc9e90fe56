"""The commands used in shell pipelines (`cache info`, `cache verify` without --rescore, `report`)
import neither torch nor transformers. Each runs in a fresh interpreter (this one has torch loaded
already); its exit code and the heavy modules it imported are printed on the last line.
Timings are not asserted here (2 shared cores): `bench/startup.py` measures them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, write_jsonl

PROBE = """
import json, sys
from dpocli.cli import main
sys.argv = ["dpo", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""


def run_probe(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "command",
    [
        ["cache", "info", "CACHE"],
        ["cache", "verify", "CACHE", "--json"],
        ["report", "METRICS"],
        ["cache", "info", "MISSING"],
    ],
)
def test_pipeline_commands_import_neither_torch_nor_transformers(small_cache, tmp_path, command):
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.5}])
    paths = {"CACHE": small_cache, "METRICS": metrics, "MISSING": tmp_path / "no-cache"}
    found = run_probe([paths.get(a, a) for a in command])
    assert found == {"code": 2 if "MISSING" in command else 0, "heavy": []}
