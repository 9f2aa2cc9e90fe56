"""The checksum record of a model folder dpocli wrote: a checkpoint, the final model, `merged/`.

`checksums.json` lists every file the folder holds when it is written (recursively, so a sharded
checkpoint's `dcp/` shards are in it) with its size and sha256. It is written inside the
temporary folder *before* the folder is renamed into place (for the final model: before its
files are moved up), so a folder that counts as complete always has its record.

`verify(folder)` runs before dpocli reads a model folder (train --model / --resume, eval, precompute
--model): a missing file, a changed size or a changed byte is refused (exit 2, naming the file).
It reads every listed file once per folder and process (sha256: 0.2 to 2 GB/s on one core
depending on the CPU; the load that follows finds the bytes in the page cache). A dpocli folder
without a record (written by an older dpocli) is loaded with one warning that it is unverified; a
folder dpocli did not write (an HF model the user brings) has no record and is loaded as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from dpocli import __version__
from dpocli.errors import DpocliError
from dpocli.io.atomic import atomic_write_json, sha256_file
from dpocli.io.console import warn
from dpocli.io.state_files import StateFile

CHECKSUMS = "checksums.json"
FORMAT = "dpocli-checksums"
# Files that mark a folder as written by dpocli (a run folder, a checkpoint of one)
DPOCLI_MARKERS = ("run_record.json", "trainer_state.json")

_verified: dict[str, tuple] = {}  # resolved folder -> the (name, size, mtime) it was verified at
_warned_unverified = False


def _files(folder: Path) -> list[str]:
    """Every file under `folder`, as POSIX paths relative to it (the record itself excluded)."""
    names = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel != CHECKSUMS:
                names.append(rel)
    return names


def write(folder: Path) -> dict:
    """Hash every file in `folder` and write its checksums.json (atomically); the record."""
    files = {rel: {"bytes": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
             for rel in _files(folder)}
    record = {"format": FORMAT, "dpocli_version": __version__, "files": files}
    atomic_write_json(folder / CHECKSUMS, record)
    return record


def is_dpocli_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in DPOCLI_MARKERS)


def _signature(folder: Path, names) -> tuple:
    out = []
    for rel in names:
        try:
            st = (folder / rel).stat()
            out.append((rel, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((rel, None, None))
    return tuple(out)


def verify(folder: str | Path) -> bool:
    """Refuse a folder whose files differ from its checksums.json. True when verified, False when
    there is no record (a dpocli folder without one is warned about once per process)."""
    global _warned_unverified
    folder = Path(folder)
    if not (folder / CHECKSUMS).exists():
        if is_dpocli_folder(folder) and not _warned_unverified:
            _warned_unverified = True
            warn(f"{folder} has no {CHECKSUMS} (written by an older dpocli): its files are unverified")
        return False
    record = StateFile.read_json(folder / CHECKSUMS, hint="the folder's checksum record is damaged; "
                                                          "use another checkpoint")
    if record.get("format", str) != FORMAT:
        raise record.refuse(f"is not a dpocli checksum record (format {record.data['format']!r})", "format")
    files = record.get("files", dict)
    key = str(folder.resolve())
    signature = _signature(folder, sorted(files))
    if _verified.get(key) == signature:
        return True
    hint = "the folder was changed after dpocli wrote it; use another checkpoint, or restore the file"
    for rel in sorted(files):
        entry = _entry(record, files, rel)
        path = folder / rel
        if not path.is_file():
            raise DpocliError(f"is missing (listed in {CHECKSUMS})", file=path, hint=hint)
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise DpocliError(f"has {size} bytes, {CHECKSUMS} records {entry.get('bytes')}",
                              file=path, field="bytes", hint=hint)
        if sha256_file(path) != entry.get("sha256"):
            raise DpocliError(f"does not match its sha256 in {CHECKSUMS} (the file was changed or "
                              "damaged)", file=path, field="sha256", hint=hint)
    _verified[key] = signature
    return True


def _entry(record: StateFile, files: dict, rel: str) -> dict:
    """The record of `rel` (file names hold dots, which `StateFile.get` would split on)."""
    entry = files[rel]
    if not isinstance(entry, dict):
        raise record.refuse(f"is {type(entry).__name__}, expected an object", f"files.{rel}")
    return entry

