"""What dpocli may write and delete: output folders are surveyed, and checked, before anything is touched.

The rule (DESIGN.md, "Safety defaults"):
* dpocli deletes only what it can prove it wrote: entries its own record lists (a cache's
  `manifest.json`, a run's `run_record.json`) and the temporaries of its atomic writes (atomic.py).
  It removes a folder only when nothing else is left in it.
* `--overwrite` replaces a dpocli cache or run, nothing else. A folder that holds anything dpocli
  did not write is never written into, cleared or deleted; the user is told which entry is foreign.
* An output never is, holds, or lies inside what the same command reads (its input, model or
  cache), and never is the working directory or one of its parents.

Everything here only looks; callers delete through `remove_owned` once every other check passed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dpocli.errors import DpocliError
from dpocli.io.atomic import temporary_base
from dpocli.io.folder_lock import is_lock_file
from dpocli.io.write_failures import write_failure


@dataclass
class Survey:
    """The entries of an existing output folder, sorted by who wrote them."""

    folder: Path
    owned: list[Path] = field(default_factory=list)  # listed in dpocli's record: replaceable
    temporaries: list[Path] = field(default_factory=list)  # leftovers of a killed dpocli write
    foreign: list[str] = field(default_factory=list)  # anything else: never touched

    def refuse_foreign(self, what: str) -> None:
        if self.foreign:
            shown = ", ".join(repr(n) for n in self.foreign[:3]) + (" ..." if len(self.foreign) > 3 else "")
            raise DpocliError(f"{what} also holds {shown}, which dpocli did not write; dpocli never "
                              "writes into, clears or deletes such a folder", file=self.folder,
                              hint="move those entries out, or choose another --out")


def survey(folder: Path, is_owned, may_write=None) -> Survey:
    """Sort `folder`'s entries with `is_owned(name) -> bool`. A temporary is ours when it was
    meant to become a name we write (`may_write(name)`, by default `is_owned`)."""
    may_write = may_write or is_owned
    found = Survey(folder)
    for entry in entries(folder):
        base = temporary_base(entry.name)
        if is_owned(entry.name):
            found.owned.append(entry)
        elif base is not None and may_write(base):
            found.temporaries.append(entry)
        else:
            found.foreign.append(entry.name)
    return found


def entries(folder: Path) -> list[Path]:
    """A folder's entries, sorted, without dpocli's own lock file (folder_lock.py): the lock of
    the command looking, or a leftover of a killed one; neither is output."""
    return [e for e in sorted(folder.iterdir()) if not is_lock_file(e)]


def remove_owned(paths: list[Path]) -> None:
    """Delete entries a survey proved to be ours (files, or folders dpocli wrote whole)."""
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as err:
            raise write_failure(path, err) from None


def remove_folder_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # something else is (still) there: it stays


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_location(out: Path, reads: dict[str, str | Path | None], flag: str = "--out",
                          writable: bool = True) -> None:
    """Refuse an output folder that is, holds or lies inside something the command reads, or that is
    the working directory or a parent of it. `reads` maps a flag name to a path (non-paths, such as
    hub ids that are not local folders, are skipped). `writable=False` leaves the write-access
    check to the caller (`check_creatable`), for an output that may turn out to be finished."""
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise DpocliError("is the working directory or one of its parents; dpocli writes its output "
                          "into a folder of its own", file=out, field=flag,
                          hint="choose a new subfolder, e.g. --out ./runs/NAME")
    check_creatable(Path(out), flag, access=writable)
    for name, path in reads.items():
        if path is None or not Path(path).expanduser().exists():
            continue
        source = Path(path).expanduser().resolve()
        if _overlaps(target, source):
            raise DpocliError(f"overlaps {name} {path}; an output must not be, hold or lie inside what "
                              "the command reads", file=out, field=flag,
                              hint="choose an --out folder outside it")


def check_creatable(folder: Path, flag: str = "--out", access: bool = True) -> None:
    """The folder exists and is writable, or its nearest existing parent is a writable folder
    (`access=False`: only that it is, or can become, a folder)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != folder and not probe.is_dir():
        raise DpocliError(f"cannot be written: {probe} is a file, not a folder", file=folder, field=flag)
    if access and probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise DpocliError(f"cannot be written: {probe} is not writable", file=folder, field=flag)


def ensure_folder(folder: Path) -> bool:
    """Create `folder` (and parents); True if this call created it, so a failed start can remove it."""
    if folder.is_dir():
        return False
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        if folder.is_dir():  # made by another command meanwhile; its lock decides (folder_lock.py)
            return False
        raise DpocliError("exists and is not a folder", file=folder) from None
    except OSError as err:
        raise write_failure(folder, err) from None
    return True


def check_writable_file(path: Path, flag: str) -> None:
    """An output file's folder exists (created if missing) and can be written, checked up front."""
    path = Path(path)
    if path.is_dir():
        raise DpocliError("is a folder; give a file name", file=path, field=flag)
    ensure_folder(path.parent)
    if not os.access(path.parent, os.W_OK):
        raise DpocliError("cannot be written (the folder is not writable)", file=path, field=flag)
