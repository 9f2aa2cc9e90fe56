"""Write files and folders so that a reader sees either nothing or the finished thing.

Everything goes to a temporary name in the destination's own directory (so the final
`os.replace` is a same-filesystem rename), is flushed and fsync'ed, then renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import NoReturn

from dpocli.errors import DpocliError
from dpocli.io.write_failures import write_failure

# The names our temporaries take: `.NAME.dpocli-tmp-<16 hex>` (files), `NAME.dpocli-tmpdir-<16 hex>`
# (folders) and `NAME.dpocli-old-<16 hex>` (a replaced folder on its way out), the hex from
# `secrets`. Only a name of exactly this form is ours: a person's `NAME.old-1` or `.NAME.bak.tmp`
# never is. `temporary_base` recognises them, so a resumed command can clean up after a killed one
# without touching anything else.
_RANDOM = 16  # hex digits of the random part
_TEMPORARY = (re.compile(r"^\.(?P<base>.+)\.dpocli-tmp-[0-9a-f]{%d}\Z" % _RANDOM),
              re.compile(r"^(?P<base>.+)\.dpocli-tmpdir-[0-9a-f]{%d}\Z" % _RANDOM),
              re.compile(r"^(?P<base>.+)\.dpocli-old-[0-9a-f]{%d}\Z" % _RANDOM))


def temporary_base(name: str) -> str | None:
    """The name a leftover temporary was meant to become, or None if `name` is not one of ours."""
    for pattern in _TEMPORARY:
        match = pattern.match(name)
        if match:
            return match.group("base")
    return None


def temporaries_of(folder: Path, name: str) -> list[Path]:
    """The leftover temporaries in `folder` that were meant to become `name`."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if temporary_base(p.name) == name)


def _random_name(path: Path, kind: str) -> Path:
    hidden = "." if kind == "tmp" else ""
    return path.with_name(f"{hidden}{path.name}.dpocli-{kind}-{secrets.token_hex(_RANDOM // 2)}")


def as_write_failure(path: Path, err: BaseException):
    """Disk full / not writable / vanished as one `error:` line (write_failures.write_failure)."""
    if isinstance(err, (DpocliError, KeyboardInterrupt, SystemExit)):
        return err
    failure = write_failure(path, err)
    # Any OSError is about the write; another exception only when it reads as a full or read-only
    # disk (safetensors, torch.save), so that a genuine bug keeps its traceback.
    recognised = isinstance(err, OSError) or "the write failed" not in failure.message
    return failure if recognised else err


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (weights and shards can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask_mode(default: int = 0o666) -> int:
    # The temporary is created 0600; honour the user's umask like a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    return default & ~umask


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets us open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary file path next to `path`; rename it to `path` if the block succeeds.

    For writers that want a path rather than bytes (pyarrow, safetensors).
    """
    path = Path(path)
    tmp = _random_name(path, "tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise as_write_failure(path, err) from None
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        failure = as_write_failure(path, err)
        if failure is err:
            raise
        raise failure from None
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder `<path>.dpocli-tmpdir-<random>`; rename it to `path` if the block
    succeeds.

    An existing `path` is replaced only after the new folder is complete. A crash leaves such a
    folder, which readers ignore and later writers clean up.
    """
    path = Path(path)
    tmp = make_temporary_dir(path)
    try:
        yield tmp
    except BaseException as err:
        _discard(tmp, path, err)
    commit_dir(tmp, path)


def _discard(tmp: Path, path: Path, err: BaseException) -> NoReturn:
    """Remove the unfinished temporary folder and raise `err`, as a one-line write failure when
    it is one (disk full, read-only); called from an `except` block."""
    shutil.rmtree(tmp, ignore_errors=True)
    failure = as_write_failure(path, err)
    if failure is err:
        raise err
    raise failure from None


def commit_dir(tmp: Path, path: Path) -> None:
    """Rename the finished temporary folder `tmp` (made by `atomic_dir`'s naming rule) to `path`;
    split out so a folder that several processes fill (a sharded checkpoint) is committed by one."""
    try:
        fsync_dir(tmp)
        if path.exists():
            old = _random_name(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as err:
        _discard(tmp, path, err)
    fsync_dir(path.parent)


def make_temporary_dir(path: Path) -> Path:
    """An empty `<path>.dpocli-tmpdir-<random>` folder next to `path` (the name `atomic_dir` uses)."""
    tmp = _random_name(path, "tmpdir")
    try:
        tmp.mkdir()  # 0777 less the umask, as any mkdir; fails if the name exists
    except OSError as err:
        raise as_write_failure(path, err) from None
    return tmp
