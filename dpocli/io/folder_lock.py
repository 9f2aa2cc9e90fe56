"""One writer per output folder: an exclusive lock on a run folder (train) or a cache being written
(precompute-ref), so a second command into the same folder is refused instead of mixing in.

The lock is `fcntl.flock` on `FOLDER/.dpocli.lock`, a file dpocli owns: it holds the holder's pid,
host and command (a JSON object of format "dpocli-lock"), which the refusal names. The kernel
releases a flock when its process dies (even by SIGKILL), so a killed run never leaves the folder
stuck: a leftover lock file is only a name, taken over by the next command. The holder deletes
the file when it is done; output surveys (outputs.py) pass over a lock file of this format and
nothing else of that name, so a user's own file is never taken for it or deleted.

flock works on local file systems and on NFS v4 (Linux emulates it with fcntl locks there); under
torchrun only rank 0, the one that writes, takes it (the other ranks wait on rank 0's verdict).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path

from dpocli.errors import DpocliError
from dpocli.io.atomic import as_write_failure

LOCK_NAME = ".dpocli.lock"
FORMAT = "dpocli-lock"


def is_lock_file(path: Path) -> bool:
    """True for a lock file dpocli wrote (the name and the format both match)."""
    if path.name != LOCK_NAME or not path.is_file() or path.stat().st_size > 4096:
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}").get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class FolderLock:
    """`acquire()` takes the lock (refusing, exit 2, when another process holds it); `release()`
    or leaving the `with` block gives it back and removes the lock file. Acquiring a lock already
    held by this object does nothing, so a command may acquire early and again at its claim."""

    def __init__(self, folder: str | Path, command: str):
        self.path = Path(folder) / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        if self.path.exists() and not is_lock_file(self.path):
            raise DpocliError(f"holds a file named {LOCK_NAME} that dpocli did not write",
                              file=self.path.parent, hint="move it out, or choose another output folder")
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise self._busy() from None
            # The holder before us may have deleted the file between our open and our lock: then we
            # hold a lock on a name nobody sees. Lock the file that is there now instead.
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)
        self._fd = fd
        holder = {"format": FORMAT, "pid": os.getpid(), "host": platform.node(),
                  "command": self.command, "argv": sys.argv[1:8],
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())

    def acquire_at_claim(self) -> None:
        """Take the lock once the folder exists, if it did not when the command inspected it;
        refuse if another command wrote into it in between."""
        if self.held:
            return
        self.acquire()
        others = [e.name for e in sorted(self.path.parent.iterdir()) if e.name != LOCK_NAME]
        if others:
            self.release()
            raise DpocliError(f"was filled by another command while this one started (it holds "
                              f"{others[0]!r})", file=self.path.parent,
                              hint="choose another output folder, or rerun once the other command is done")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise as_write_failure(self.path, err) from None

    def _busy(self) -> DpocliError:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            who = (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}, "
                   f"since {holder.get('started')})")
        except (OSError, ValueError, AttributeError):
            who = "another process"
        return DpocliError(f"is in use by another dpocli command: {who}", file=self.path.parent,
                           hint="wait for it to finish, or choose another output folder")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still holding the lock: no one else is using this file
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
