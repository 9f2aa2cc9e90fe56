"""The raw rows of the input files (JSON Lines, Parquet, Arrow), read with bounded memory and
refused with one line naming file and row when they cannot be read. Validation is examples.py's."""

from __future__ import annotations

import difflib
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dpocli.data import chat
from dpocli.data.chat import type_name as _type_name
from dpocli.data.sources import ARROW_SUFFIXES
from dpocli.errors import DpocliError
from dpocli.io.nesting import check_depth, too_deep

_BOM = b"\xef\xbb\xbf"


_PARQUET_BATCH_ROWS = 1024  # rows hold long texts; a batch bounds memory, not the file size


@dataclass(frozen=True)
class Columns:
    prompt: str
    chosen: str
    rejected: str
    id: str | None



def iter_jsonl(path: Path, columns: Columns, max_row_bytes: int, warnings: list[str],
                ignored: dict) -> Iterator:
    """Rows of a JSON Lines file. Keys no stage uses are added to `ignored` (for one warning)."""
    used = _used_columns(columns)
    prompt_checked = False  # look for a near-miss prompt column once per file, not once per row
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        row = 0
        while True:
            # The limit makes a runaway line (a binary file, a missing newline) fail fast instead of
            # loading gigabytes before we can complain.
            raw = f.readline(max_row_bytes + 1)
            if not raw:
                return
            row += 1
            loc = {"file": str(path), "row": row}
            if len(raw) > max_row_bytes and not raw.endswith(b"\n"):
                raise _too_large(max_row_bytes, loc)
            if row == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]  # Windows editors write one; json.loads would reject it
            try:
                text = raw.decode("utf-8")  # decode ourselves: json.loads(bytes) would guess UTF-16/32
            except UnicodeDecodeError as e:
                raise DpocliError(f"line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                                  **loc) from None
            if not text.strip():
                continue  # blank lines are skipped, but still counted so row == line number
            try:
                # Stripped, so a position past the end means "line ended early".
                record = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DpocliError(f"line is not valid JSON ({e.msg} at character {e.pos + 1})",
                                  **loc) from None
            except RecursionError:  # the parser's own limit, far past MAX_DEPTH
                raise too_deep(loc) from None
            if not isinstance(record, dict):
                raise DpocliError(f"line is JSON but not an object (got {_type_name(record)})", **loc)
            check_depth(record, loc)
            _refuse_lone_surrogates(record, loc)
            if not prompt_checked and columns.prompt not in record:
                _warn_implicit_prompt(path, columns.prompt, record.keys(), warnings)
                prompt_checked = True
            chat.refuse_images(record, loc)
            ignored.update((k, None) for k in record if k not in used)
            yield row, record



def _refuse_lone_surrogates(record: dict, loc: dict) -> None:
    """JSON may escape half of a UTF-16 pair (\\ud800) on its own; that is no text a tokenizer can
    take, so the row is refused here, naming the field, instead of failing deep in the tokenizer."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        def broken(value) -> bool:
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
                return False
            except UnicodeEncodeError:
                return True
        field = next((k for k, v in record.items() if broken(v)), None)
        raise DpocliError("holds a lone UTF-16 surrogate escape (such as \\ud800), which is not valid text",
                          field=field, **loc) from None



class _ArrowStream:
    """The subset of ParquetFile's interface we use, over an Arrow IPC (stream or file) file."""

    def __init__(self, path: Path):
        self._source = pa.memory_map(str(path))
        try:
            self._reader = pa.ipc.open_stream(self._source)
            self._batches = lambda: iter(self._reader)
        except pa.ArrowInvalid:
            self._source.seek(0)
            self._reader = pa.ipc.open_file(self._source)
            self._batches = lambda: (self._reader.get_batch(i)
                                     for i in range(self._reader.num_record_batches))
        self.schema_arrow = self._reader.schema

    def iter_batches(self, batch_size: int, columns: list[str]):
        for batch in self._batches():
            yield batch.select(columns)

    def close(self) -> None:
        self._source.close()



def iter_columnar(path: Path, columns: Columns, max_row_bytes: int, warnings: list[str],
                   ignored: dict) -> Iterator:
    """Rows of a Parquet file, or of an Arrow IPC file from an HF `save_to_disk` folder."""
    try:
        parquet = _ArrowStream(path) if path.name.lower().endswith(ARROW_SUFFIXES) else pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise _unreadable_parquet(path, e) from None
    row = 0
    try:
        for name, flag in ((columns.chosen, "--chosen-column"), (columns.rejected, "--rejected-column"),
                           (columns.id, "--id-column")):
            if name is not None and name not in names:
                raise missing_column(name, flag, names, {"file": str(path)})
        if columns.prompt not in names:
            _warn_implicit_prompt(path, columns.prompt, names, warnings)
        chat.refuse_images(names, {"file": str(path)})
        # Only the columns we use: a dataset with long metadata columns stays cheap to read.
        used = _used_columns(columns)
        wanted = [c for c in used if c in names]
        ignored.update((n, None) for n in names if n not in used)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted):
            values = {name: batch.column(name).to_pylist() for name in batch.schema.names}
            for i in range(batch.num_rows):
                row += 1
                record = {name: column[i] for name, column in values.items()}
                check_depth(record, {"file": str(path), "row": row})
                if _text_bytes(record) > max_row_bytes:
                    raise _too_large(max_row_bytes, {"file": str(path), "row": row})
                yield row, record
    except (pa.ArrowException, OSError) as e:
        raise _unreadable_parquet(path, e) from None
    finally:
        parquet.close()



def _used_columns(columns: Columns) -> tuple[str, ...]:
    """Every column some stage reads (the rest are ignored, by TRL too)."""
    return tuple(dict.fromkeys((columns.prompt, columns.chosen, columns.rejected, columns.id or "id",
                                chat.TOOLS_COLUMN, chat.KWARGS_COLUMN)))



def missing_column(name: str, flag: str, available, loc: dict) -> DpocliError:
    available = [str(a) for a in available]
    close = difflib.get_close_matches(name, available, n=1)
    suggestion = f"did you mean '{close[0]}'? pass {flag} {close[0]}" if close else f"pass {flag} NAME"
    return DpocliError(f"is missing ({suggestion})", field=name, **loc,
                       hint="columns found: " + (", ".join(sorted(available)) or "none"))



def _warn_implicit_prompt(path: Path, prompt_column: str, available, warnings: list[str]) -> None:
    # A near-miss column name ("promt") probably is the prompt; without it we would infer one silently.
    close = difflib.get_close_matches(prompt_column, [str(a) for a in available], n=1)
    if close:
        warnings.append(f"{path}: no '{prompt_column}' column, so prompts are inferred from chosen/rejected; "
                        f"did you mean '{close[0]}'? pass --prompt-column {close[0]}")



def _too_large(max_row_bytes: int, loc: dict) -> DpocliError:
    return DpocliError(f"row is larger than max_row_bytes ({max_row_bytes} bytes)", **loc,
                       hint="check that the file is JSON Lines (one object per line); rows this long "
                            "are refused to keep memory bounded")



def _unreadable_parquet(path: Path, error: Exception) -> DpocliError:
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return DpocliError(f"is not a readable Parquet file ({detail})", file=path,
                       hint="the file may be truncated or corrupt; write it again")



def _text_bytes(value) -> int:
    """UTF-8 size of the text in a Parquet row: the stand-in for a JSONL line's length."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    parts = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return sum(_text_bytes(v) for v in parts)
