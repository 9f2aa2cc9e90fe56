"""A failed write, read: disk full, folder not writable, or gone, as one `error:` line.

The lowest write layer (atomic.py) and everything above it report write failures through here,
so the wording and the hint (rerun: finished work is kept) are the same everywhere.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from dpocli.errors import RunFailure

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_failure(path: Path, err: BaseException) -> RunFailure:
    """A one-line runtime error for a failed write: disk full, folder not writable, or gone.

    Writers report failures in different shapes (OSError with errno, pyarrow's and safetensors'
    own messages, torch's "file write failed"), so the folder itself is examined too."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    code = getattr(err, "errno", None)
    text = str(err)
    if code in _FULL or "No space left" in text or "StorageFull" in text or _nearly_full(folder):
        why = "no space left on the device"
        hint = "free some space, then rerun the same command: finished work is kept and resumes"
    elif code in _DENIED or "Permission denied" in text or "Read-only" in text \
            or (folder.exists() and not os.access(folder, os.W_OK)):
        why = "the folder is not writable"
        hint = "make it writable (or choose another output), then rerun the same command"
    elif code == errno.ENOENT or not folder.exists():
        why = "the folder vanished while dpocli was writing to it"
        hint = "rerun the same command"
    else:
        why = f"the write failed ({type(err).__name__}: {text.splitlines()[0] if text else ''})"
        hint = "rerun the same command; finished work is kept"
    return RunFailure(f"cannot be written: {why}", file=path, hint=hint)


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False
