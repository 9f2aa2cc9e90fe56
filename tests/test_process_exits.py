"""Every command is honest about how it ends, as a shell sees it: SIGTERM, a closed or broken
stdout, an address-space limit (`ulimit -v`) and a huge row each end in their documented line and
status, never a traceback or a native abort. Run as real processes (subprocess)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from conftest import MODEL

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def dpo(*args) -> list[str]:
    return [sys.executable, "-m", "dpocli", *[str(a) for a in args]]


def limit_address_space(limit_bytes: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return preexec


def assert_no_traceback(stderr: str) -> None:
    for sign in ("Traceback", "internal error", "Error in sys.excepthook", "panicked", "Exception ignored"):
        assert sign not in stderr, stderr


def test_sigterm_ends_eval_with_130_and_a_message(small_cache):
    """The README promises exit 130 for SIGTERM on every command; eval used to die silently (143)."""
    proc = subprocess.Popen(dpo("eval", small_cache, *["--model", MODEL] * 200, "--quiet"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # mid-import or mid-evaluation: both must end the same way
    assert proc.poll() is None, "finished before the signal"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # 130, or death by SIGINT (Python's own way out of a KeyboardInterrupt, seen once when the
    # signal landed in the interpreter's shutdown): a shell reports both as $? = 130.
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "interrupted" in err and out == ""
    assert_no_traceback(err)


def test_a_closed_stdout_is_one_error_line(small_cache):
    proc = subprocess.run(dpo("cache", "info", small_cache, "--json"), env=ENV, stderr=subprocess.PIPE,
                          text=True, preexec_fn=lambda: os.close(1))
    assert proc.returncode in (1, 2), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stdout is closed" in errors[0], proc.stderr
    assert_no_traceback(proc.stderr)


@pytest.mark.parametrize("as_json", [True, False])
def test_a_broken_pipe_ends_quietly_with_141(small_cache, as_json):
    """`dpo ... | head -c1` where head is gone before the result is written: the shell's status
    for SIGPIPE (128 + 13), nothing on stderr."""
    proc = subprocess.Popen(dpo("cache", "info", small_cache, *(["--json"] if as_json else [])), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader goes away at once
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 141, err
    assert err == ""


def test_a_reader_that_took_the_whole_result_is_success(small_cache):
    shell = f"set -o pipefail; {' '.join(dpo('cache', 'info', small_cache, '--json'))} | head -c 100000"
    proc = subprocess.run(["bash", "-c", shell], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["complete"] is True


@pytest.mark.parametrize("limit_mb", [30, 200])
def test_an_address_space_limit_during_imports_is_the_out_of_memory_line(small_cache, limit_mb):
    """30 MB fails while Python imports the CLI itself, 200 MB while it maps torch's libraries."""
    proc = subprocess.run(dpo("eval", small_cache, "--model", MODEL), env=ENV, capture_output=True,
                          text=True, preexec_fn=limit_address_space(limit_mb * 2**20))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: out of memory"), proc.stderr
    assert_no_traceback(proc.stderr)


def _huge_row(tmp_path, megabytes: int):
    rows = [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
            {"prompt": "Say hi.", "chosen": "word " * (megabytes * 2**20 // 5), "rejected": "No."}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_huge_field_under_a_memory_limit_is_refused_before_the_tokenizer(tmp_path):
    """A 12 MB field (under the 16 MiB row limit) used to reach the tokenizer, which needs ~2 GB
    for it and aborts natively under `ulimit -v 3G`; it is now refused naming file:row."""
    prefs = _huge_row(tmp_path, 12)
    proc = subprocess.run(dpo("precompute-ref", prefs, "--model", MODEL, "--out", tmp_path / "cache"), env=ENV,
                          capture_output=True, text=True, preexec_fn=limit_address_space(3 * 2**30))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {prefs}:2: field 'chosen' is ") and "--max-field-bytes" in proc.stderr
    assert_no_traceback(proc.stderr)
    assert not (tmp_path / "cache").exists()


def test_max_field_bytes_is_configurable(tmp_path):
    from dpocli.precompute.config import PrecomputeConfig
    from dpocli.precompute.run import run_precompute
    prefs = _huge_row(tmp_path, 1)
    config = PrecomputeConfig(input=str(prefs), model=str(MODEL), out=str(tmp_path / "c"), max_field_bytes=2**19)
    with pytest.raises(Exception, match=r"prefs.jsonl:2: field 'chosen' is 1048575 bytes of text, more than "
                                        r"--max-field-bytes 524288"):
        run_precompute(config)
    summary = run_precompute(PrecomputeConfig(input=str(prefs), model=str(MODEL), out=str(tmp_path / "c"),
                                              max_field_bytes=2**21, max_length=64))
    assert summary["rows_written"] == 2
