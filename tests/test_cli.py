"""CLI conventions: help everywhere, results on stdout only, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import MODEL, invoke

COMMANDS = [["precompute-ref"], ["train"], ["eval"], ["cache", "info"]]


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


def test_json_goes_to_stdout_and_logs_to_stderr(small_cache):
    result = invoke(["cache", "info", small_cache, "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)  # exactly one object
    assert info["complete"] and info["rows_written"] == 48
    result = invoke(["eval", small_cache, "--model", MODEL, "--json"])
    assert result.stdout.count("\n") == 1 and json.loads(result.stdout)["command"] == "eval"


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
