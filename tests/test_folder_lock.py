"""One writer per output folder (a lock that dies with its process), and a finished cache that
needs no write access."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODEL, invoke
from dpocli.errors import DpocliError
from dpocli.io.folder_lock import LOCK_NAME, FolderLock

HOLD = ("import sys, time\n"
        "from dpocli.io.folder_lock import FolderLock\n"
        "FolderLock(sys.argv[1], sys.argv[2]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n")


@pytest.fixture
def holder():
    """Start a process that holds the lock of a folder; yields a function (folder, command) -> Popen."""
    procs = []

    def start(folder: Path, command: str = "train") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), command], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_train_into_a_locked_run_folder_is_refused_naming_the_holder(small_cache, tmp_path, holder):
    run = tmp_path / "run"
    args = ["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 2, "--batch-size", 4, "--quiet"]
    assert invoke(args).exit_code == 0
    proc = holder(run, "train")
    before = files_of(run)
    for extra in (["--resume"], ["--overwrite"]):
        result = invoke(args + extra)
        assert result.exit_code == 2, result.stderr
        assert "in use by another dpocli command" in result.stderr
        assert f"pid {proc.pid} " in result.stderr and "train" in result.stderr
        assert files_of(run) == before  # nothing of this command mixed in
    # The lock dies with its process, even killed: the folder is not left stuck.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = invoke(args + ["--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert not (run / LOCK_NAME).exists()  # the holder's leftover was taken over, then removed


def test_a_second_precompute_into_a_cache_being_written_is_refused(small_prefs, tmp_path, holder):
    out = tmp_path / "cache"
    out.mkdir()
    proc = holder(out, "precompute-ref")
    result = invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", out, "--quiet"])
    assert result.exit_code == 2, result.stderr
    assert f"pid {proc.pid} " in result.stderr and "precompute-ref" in result.stderr
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]


def test_a_run_leaves_no_lock_behind_and_the_lock_file_is_dpoclis(small_cache, tmp_path):
    run = tmp_path / "run"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 1,
                     "--batch-size", 4, "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert not (run / LOCK_NAME).exists()


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path):
    first, second = FolderLock(tmp_path, "train"), FolderLock(tmp_path, "eval")
    first.acquire()
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["format"] == "dpocli-lock" and holder["pid"] == os.getpid() and holder["command"] == "train"
    with pytest.raises(DpocliError, match=f"pid {os.getpid()} on .* \\(train, since"):
        second.acquire()
    first.acquire()  # already held by this object: nothing to do
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with second:
        second.acquire()
        assert second.held
    assert not second.held and not (tmp_path / LOCK_NAME).exists()


def test_a_users_file_of_the_lock_name_is_never_taken_or_deleted(tmp_path):
    mine = tmp_path / LOCK_NAME
    mine.write_text("my notes\n")
    with pytest.raises(DpocliError, match="did not write"):
        FolderLock(tmp_path, "train").acquire()
    assert mine.read_text() == "my notes\n"


def test_a_folder_filled_by_another_command_at_the_claim_is_refused(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"someone else's")
    lock = FolderLock(tmp_path, "precompute-ref")
    with pytest.raises(DpocliError, match="filled by another command"):
        lock.acquire_at_claim()
    assert not lock.held and not (tmp_path / LOCK_NAME).exists()
    assert (tmp_path / "part-00000.parquet").read_bytes() == b"someone else's"


def _run_read_only(folder: Path, args: list) -> subprocess.CompletedProcess:
    """`dpo ARGS` with `folder` read-only: chmod for a normal user; for root (which chmod does not
    stop) a read-only bind mount in a private mount namespace (`unshare`), else skipped."""
    command = [sys.executable, "-m", "dpocli", *[str(a) for a in args]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            return subprocess.run(command, capture_output=True, text=True, env=env)
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("running as root without unshare: cannot make a folder read-only")
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(folder), *command],
                          capture_output=True, text=True, env=env)


def test_rerunning_a_finished_precompute_on_a_read_only_folder_is_a_no_op(small_prefs, small_cache, tmp_path):
    cache = Path(shutil.copytree(small_cache, tmp_path / "cache"))
    before = files_of(cache)
    args = ["precompute-ref", small_prefs, "--model", MODEL, "--out", cache, "--rows-per-shard", 16,
            "--batch-size", 8, "--json"]
    result = _run_read_only(cache, args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "already_complete"
    assert files_of(cache) == before
    # A cache still to write there needs write access, and says so before anything else.
    empty = tmp_path / "empty"
    empty.mkdir()
    fresh = _run_read_only(empty, args[:5] + [empty] + args[6:])
    assert fresh.returncode == 2 and "not writable" in fresh.stderr, fresh.stderr
    assert not any(empty.iterdir())
