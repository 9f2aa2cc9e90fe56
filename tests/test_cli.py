"""CLI conventions: help everywhere, results on stdout only, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import MODEL, SAMPLE, invoke
from dpocli import __version__

COMMANDS = [["precompute-ref"], ["train"], ["eval"], ["report"], ["cache", "info"], ["cache", "verify"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command):
    result = invoke([*command, "--help"])
    assert result.exit_code == 0
    assert "Exit codes" in result.stdout and "--json" in result.stdout


def test_version_and_root_help():
    assert invoke(["--version"]).stdout.startswith("dpocli ")
    out = invoke(["--help"]).stdout
    for name in ("precompute-ref", "train", "eval", "cache"):
        assert name in out


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_cache) -> dict:
    """A 4-row input and a 1-step run, for the commands that need one."""
    root = tmp_path_factory.mktemp("cli")
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join((SAMPLE / "train.jsonl").read_text().splitlines(keepends=True)[:4]))
    run = root / "run"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 1, "--quiet"])
    assert result.exit_code == 0, result.stderr
    return {"prefs": prefs, "cache": small_cache, "run": run}


# Every command, with --json: (expected "command" value, arguments given the world and a fresh folder).
JSON_RUNS = {
    "precompute-ref": lambda w, tmp: ["precompute-ref", w["prefs"], "--model", MODEL, "--out", tmp / "c"],
    "train": lambda w, tmp: ["train", w["cache"], "--model", MODEL, "--out", tmp / "r", "--max-steps", 1],
    "eval": lambda w, tmp: ["eval", w["cache"], "--model", MODEL],
    "report": lambda w, tmp: ["report", w["run"]],
    "cache info": lambda w, tmp: ["cache", "info", w["cache"]],
    "cache verify": lambda w, tmp: ["cache", "verify", w["cache"], "--rescore", 2],
}


@pytest.mark.parametrize("command", list(JSON_RUNS))
def test_json_is_exactly_one_object_on_stdout(command, world, tmp_path):
    result = invoke([*JSON_RUNS[command](world, tmp_path), "--json"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    summary = json.loads(result.stdout)
    assert isinstance(summary, dict)
    assert summary["command"] == command and summary["dpocli_version"] == __version__
    assert "{" not in result.stderr  # the result is not echoed to stderr


def test_logs_go_to_stderr_and_quiet_silences_them(world, tmp_path):
    out = tmp_path / "cache"
    args = ["precompute-ref", world["prefs"], "--model", MODEL, "--out", out, "--json"]
    assert invoke(args).exit_code == 0
    again = invoke(args)  # a complete cache: logged as a no-op on stderr, the result on stdout
    assert again.exit_code == 0
    assert "already complete" in again.stderr and str(out) in again.stderr
    assert "already complete" not in again.stdout and json.loads(again.stdout)["status"] == "already_complete"
    quiet = invoke([*args, "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert json.loads(quiet.stdout)["status"] == "already_complete"  # --quiet silences logs, not results


def test_missing_cache_is_a_one_line_error_with_exit_2(tmp_path):
    result = invoke(["eval", tmp_path / "nope", "--model", MODEL])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and str(tmp_path / "nope") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_loss_suggests_the_close_name(small_cache, tmp_path):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--loss", "sigmod"])
    assert result.exit_code == 2 and "sigmoid" in result.stderr
    assert not (tmp_path / "r").exists()  # bad flags are caught before anything is written


def test_bad_dtype_is_a_usage_error(small_cache, tmp_path):
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "r", "--dtype", "fp8"])
    assert result.exit_code == 2


def test_console_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "dpocli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("dpocli ")
