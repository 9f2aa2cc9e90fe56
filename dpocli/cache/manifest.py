"""The cache's manifest, its commit record, and the checks that need no Parquet reader.

`dpo cache info` needs only this module: it reads the manifest and checks each shard's presence
and row count from the Parquet footer, with the standard library alone. Importing pyarrow and
numpy would take longer than the command's own work (bench/startup.py). `cache.py` holds the
Parquet half (schema, shard writing, loading rows) and re-exports these names. The layout and
invariants of a cache folder are described there.

Standard library only: no pyarrow, no numpy, no torch (tests/test_architecture.py checks this).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpocli import __version__
from dpocli.errors import DpocliError
from dpocli.io.atomic import atomic_write_json, sha256_file

FORMAT = "dpocli-reference-cache"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SHARD_PATTERN = re.compile(r"^part-(\d{5})\.parquet$")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# The type of every manifest field dpocli reads. The checksum proves only that the manifest is
# consistent (anyone can recompute a sha256), so a re-signed manifest with a field missing or of
# another type is refused here, naming the field, before any code reads it. A dict describes an
# object (a key ending in "?" may be absent), {"*": T} an object of any keys with values T, [T] a
# list of T, a tuple the allowed types; `int` never admits a JSON true/false.
_NAME = str  # a file name: checked by `_check_names`
_SHARD = {"index": int, "file": _NAME, "rows": int, "sha256": str, "dropped?": {"*": int},
          "budget": {"batch_size": (int, None), "max_tokens": (int, None)}}
_SPEC = {
    "conventions": str,
    "reference_model": {"path": str, "revision": (str, None), "sha256": (str, None), "fingerprint?": str},
    "tokenizer": {"fingerprint": str, "eos_token": (str, None), "pad_token_id": int},
    "max_length": int, "truncation": str, "dtype": ("float32", "bfloat16", "float16"),
    "attn_implementation": str, "token_logps": bool,
    "batching": {"rows_per_shard": int, "packing": bool, "prefix_sharing": bool},
    "input": {"files": [dict], "hub?": dict, "split?": str, "subset?": str,
              "columns": {"prompt": str, "chosen": str, "rejected": str, "id": (str, None)},
              "drop_identical": bool, "dropped_on_read": {"*": int}},
}
MANIFEST_SCHEMA = {"spec": _SPEC, "planned_shards": int, "rows_read": int, "shards": [_SHARD],
                   "complete": bool, "length_stats": dict, "created": dict, "tokenizer_files": {"*": _NAME}}


def _type_name(expected) -> str:
    if isinstance(expected, tuple):
        return " or ".join(_type_name(e) for e in expected)
    if isinstance(expected, str):
        return repr(expected)
    if isinstance(expected, list):
        return "a list"
    if isinstance(expected, dict) or expected is dict:
        return "an object"
    return {None: "null", int: "an integer", bool: "true or false", str: "a string"}[expected]


def _matches(value, expected) -> bool:
    if isinstance(expected, tuple):
        return any(_matches(value, e) for e in expected)
    if expected is None:
        return value is None
    if isinstance(expected, str):
        return value == expected
    if isinstance(expected, dict) or expected is dict:
        return isinstance(value, dict)
    if isinstance(expected, list):
        return isinstance(value, list)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def check_schema(value, expected, where: str, path: str = "") -> None:
    """Refuse (exit 2, naming the dotted field) a value that `expected` (see MANIFEST_SCHEMA) does
    not describe."""
    if not _matches(value, expected):
        raise DpocliError(f"is {type(value).__name__} {_short(value)}, expected "
                          f"{_type_name(expected)}", file=where, field=path,
                          hint="recreate the cache with `dpo precompute-ref`")
    chosen = expected
    if isinstance(expected, tuple):
        chosen = next(e for e in expected if _matches(value, e))
    if isinstance(chosen, list):
        for i, item in enumerate(value):
            check_schema(item, chosen[0], where, f"{path}[{i}]")
    elif isinstance(chosen, dict) and set(chosen) == {"*"}:
        for key, item in value.items():
            check_schema(item, chosen["*"], where, f"{path}.{key}")
    elif isinstance(chosen, dict):
        for key, sub in chosen.items():
            name = key.rstrip("?")
            field_path = f"{path}.{name}" if path else name
            if name in value:
                check_schema(value[name], sub, where, field_path)
            elif not key.endswith("?"):
                raise DpocliError("is missing", file=where, field=field_path,
                                  hint="recreate the cache with `dpo precompute-ref`")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_names(body: dict, where: str) -> None:
    """Every name the manifest gives is a plain name inside the cache folder: a shard is
    `part-NNNNN.parquet` of its own index, a tokenizer file a name without a folder part."""
    for i, entry in enumerate(body["shards"]):
        if entry["file"] != shard_name(entry["index"]) or entry["index"] < 0:
            raise DpocliError(f"is {_short(entry['file'])}; a shard of this cache is "
                              f"{shard_name(max(entry['index'], 0))}, inside the cache folder", file=where,
                              field=f"shards[{i}].file", hint="recreate the cache with `dpo precompute-ref`")
    for name in body["tokenizer_files"]:
        if not is_plain_name(name):
            raise DpocliError(f"lists {_short(name)}, which is not a plain file name inside tokenizer/",
                              file=where, field="tokenizer_files",
                              hint="recreate the cache with `dpo precompute-ref`")


def is_plain_name(name: str) -> bool:
    """A name of one entry of a folder: not empty, `.` or `..`, no separator, no NUL."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def inside(folder: str | Path, path: Path) -> Path:
    """`path`, refused (exit 2) unless it resolves inside `folder` (a symlink out of it, `..`)."""
    root = Path(folder).resolve()
    target = path.resolve()
    if target != root and root not in target.parents:
        raise DpocliError(f"resolves to {target}, outside {root}; a cache's files must lie inside its "
                          "folder", file=path, hint="recreate the cache with `dpo precompute-ref`")
    return target


@dataclass
class Manifest:
    """The commit record of a cache folder (see module docstring)."""

    spec: dict
    planned_shards: int
    rows_read: int
    # {"index", "file", "rows", "sha256", "dropped", "budget"}
    shards: list[dict] = field(default_factory=list)
    complete: bool = False
    length_stats: dict = field(default_factory=dict)
    created: dict = field(default_factory=dict)  # timestamps, host, versions: not fingerprinted
    tokenizer_files: dict = field(default_factory=dict)  # file name in tokenizer/ -> sha256

    @property
    def spec_fingerprint(self) -> str:
        return fingerprint(self.spec)

    @property
    def rows_written(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def dropped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.shards:
            for reason, n in s.get("dropped", {}).items():
                total[reason] = total.get(reason, 0) + n
        for reason, n in self.spec.get("input", {}).get("dropped_on_read", {}).items():
            total[reason] = total.get(reason, 0) + n
        return total

    def to_dict(self) -> dict:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, "dpocli_version": __version__,
                **asdict(self), "spec_fingerprint": self.spec_fingerprint,
                "rows_written": self.rows_written, "dropped": self.dropped}
        body["manifest_sha256"] = fingerprint(body)
        return body

    @classmethod
    def from_dict(cls, body: dict, where: str) -> "Manifest":
        if not isinstance(body, dict):
            raise DpocliError(f"is not a dpocli cache manifest (a JSON {type(body).__name__}, not an "
                              "object)", file=where)
        if body.get("format") != FORMAT:
            raise DpocliError(f"is not a dpocli cache manifest (format {body.get('format')!r})",
                              file=where, field="format")
        if body.get("format_version") != FORMAT_VERSION:
            raise DpocliError(f"has format version {body.get('format_version')!r}; this dpocli reads "
                              f"version {FORMAT_VERSION}", file=where, field="format_version",
                              hint="recreate the cache with this version's `dpo precompute-ref`")
        claimed = body.get("manifest_sha256")
        unsigned = {k: v for k, v in body.items() if k != "manifest_sha256"}
        if claimed != fingerprint(unsigned):
            raise DpocliError("was modified after dpocli wrote it (checksum mismatch)", file=where,
                              field="manifest_sha256",
                              hint="recreate the cache, or restore the original manifest.json")
        check_schema(body, MANIFEST_SCHEMA, where)
        _check_names(body, where)
        return cls(**{k: body[k] for k in MANIFEST_SCHEMA})


def read_manifest(cache_dir: str | Path) -> Manifest:
    path = Path(cache_dir) / MANIFEST_NAME
    if not Path(cache_dir).is_dir():
        raise DpocliError("no such cache folder", file=cache_dir)
    if not path.exists():
        raise DpocliError("has no manifest.json; not a dpocli cache (or precompute never finished "
                          "a shard)", file=cache_dir)
    if not path.is_file() and not path.is_dir():  # a FIFO would block the read
        raise DpocliError("is not a regular file", file=path)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DpocliError(f"is not valid JSON ({err})", file=path) from None
    except RecursionError:
        raise DpocliError("nests JSON arrays or objects too deeply to be a manifest", file=path) from None
    except OSError as err:  # a folder named manifest.json, unreadable permissions
        raise DpocliError(f"cannot be read ({err.strerror})", file=path) from None
    return Manifest.from_dict(body, str(path))


def commit_manifest(cache_dir: str | Path, manifest: Manifest) -> None:
    atomic_write_json(Path(cache_dir) / MANIFEST_NAME, manifest.to_dict())


def explain_mismatch(expected, actual, path: str = "") -> str | None:
    """The first field (dotted path) where two spec dicts differ, with both values; None if equal."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            sub = f"{path}.{key}" if path else key
            if key not in expected or key not in actual:
                return f"{sub}: {'missing' if key not in actual else 'unexpected'}"
            found = explain_mismatch(expected[key], actual[key], sub)
            if found:
                return found
        return None
    if expected != actual:
        short = lambda v: (repr(v)[:60] + "...") if len(repr(v)) > 63 else repr(v)  # noqa: E731
        return f"{path}: cache has {short(actual)}, run expects {short(expected)}"
    return None


def verify_shards(cache_dir: str | Path, manifest: Manifest, *, checksums: bool = True) -> None:
    """Every listed shard exists, has the listed row count and (optionally) the listed sha256."""
    for entry in manifest.shards:
        path = Path(cache_dir) / entry["file"]
        if not path.exists():
            raise DpocliError("is listed in the manifest but missing", file=path)
        inside(cache_dir, path)
        if not path.is_file():
            raise DpocliError("is not a regular file", file=path)
        try:
            rows = parquet_num_rows(path)
        except (OSError, ValueError):
            raise DpocliError("is not a readable Parquet file (truncated or corrupt)", file=path) from None
        if rows != entry["rows"]:
            raise DpocliError(f"has {rows} rows, the manifest lists {entry['rows']}", file=path,
                              field="rows")
        if checksums and sha256_file(path) != entry["sha256"]:
            raise DpocliError("does not match its checksum in the manifest (modified or corrupt)",
                              file=path, field="sha256", hint="recreate the cache")
        replay = entry.get("replay")
        if replay:  # a derived cache's reference forwards (cache.read_replay)
            path = Path(cache_dir) / replay["file"]
            if not path.is_file():
                raise DpocliError("is listed in the manifest but missing", file=path)
            if checksums and sha256_file(path) != replay["sha256"]:
                raise DpocliError("does not match its checksum in the manifest (modified or corrupt)",
                                  file=path, field="sha256", hint="recreate the cache")


def tokenizer_file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file in a saved tokenizer folder, by name (what the manifest records)."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def verify_tokenizer_files(cache_dir: str | Path, manifest: Manifest, *, checksums: bool = True) -> None:
    """`tokenizer/` holds exactly the files the manifest lists, with (optionally) their sha256s."""
    folder = Path(cache_dir) / TOKENIZER_DIR
    listed = manifest.tokenizer_files
    hint = "restore the cache's original tokenizer/ folder, or recreate the cache"
    if not listed:
        raise DpocliError("lists no tokenizer files", file=Path(cache_dir) / MANIFEST_NAME,
                          field="tokenizer_files", hint="recreate the cache")
    if folder.is_dir():
        inside(cache_dir, folder)
    found = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    for name in sorted(set(listed) | found):
        path = folder / name
        if name in found:
            inside(folder, path)
        if name not in listed:
            # An added file can change what AutoTokenizer loads (tokenizer.json beats vocab files).
            raise DpocliError("is not one of the tokenizer files the manifest lists", file=path,
                              field="tokenizer_files", hint=hint)
        if name not in found:
            raise DpocliError("is listed in the manifest but missing", file=path,
                              field="tokenizer_files", hint=hint)
        if checksums and sha256_file(path) != listed[name]:
            raise DpocliError("does not match its sha256 in the manifest (the tokenizer was replaced "
                              "or edited)", file=path, field="tokenizer_files", hint=hint)



def info(cache_dir: str | Path) -> dict:
    """`dpo cache info`: what produced the cache, from its manifest (shards checked for presence
    and row counts, not checksums, so it stays fast on big caches)."""
    manifest = read_manifest(cache_dir)
    verify_shards(cache_dir, manifest, checksums=False)
    spec = manifest.spec
    return {
        "command": "cache info", "dpocli_version": __version__, "cache": str(cache_dir),
        "complete": manifest.complete,
        "format_version": FORMAT_VERSION, "spec_fingerprint": manifest.spec_fingerprint,
        "reference_model": spec["reference_model"], "tokenizer_fingerprint": spec["tokenizer"]["fingerprint"],
        "max_length": spec["max_length"], "truncation": spec["truncation"], "dtype": spec["dtype"],
        "attn_implementation": spec["attn_implementation"], "batching": spec["batching"],
        "conventions": spec["conventions"], "token_logps": spec["token_logps"],
        "input_files": spec["input"]["files"], "rows_read": manifest.rows_read,
        "rows_written": manifest.rows_written, "rows_dropped": manifest.dropped,
        "shards": len(manifest.shards), "planned_shards": manifest.planned_shards,
        "length_stats": manifest.length_stats, "created": manifest.created,
        # A vision-language cache: how many images its shards hold, and their encoded bytes.
        **({"vision": {**spec["vision"], "images": sum(s.get("images", 0) for s in manifest.shards),
                       "image_bytes": sum(s.get("image_bytes", 0) for s in manifest.shards)}}
           if "vision" in spec else {}),
    }


PARQUET_MAGIC = b"PAR1"


def parquet_num_rows(path: str | Path) -> int:
    """The row count in a Parquet file's footer, read without a Parquet library.

    A Parquet file ends with `FileMetaData` (Thrift compact protocol), its length as 4 bytes
    little-endian, and `PAR1`. `num_rows` is FileMetaData's field 3 (parquet.thrift in
    apache/parquet-format). The fields before it (version, schema) are skipped without being
    decoded. Raises ValueError for a file that is not Parquet or whose footer is cut short.
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < 12:
            raise ValueError("too short for Parquet")
        f.seek(size - 8)
        tail = f.read(8)
        footer_len = int.from_bytes(tail[:4], "little")
        f.seek(0)
        if tail[4:] != PARQUET_MAGIC or f.read(4) != PARQUET_MAGIC or footer_len > size - 12:
            raise ValueError("no Parquet magic bytes, or a footer longer than the file")
        f.seek(size - 8 - footer_len)
        reader = _ThriftCompact(f.read(footer_len))
    try:
        for field_id, kind in reader.fields():
            if field_id == 3 and kind == _ThriftCompact.I64:
                return reader.zigzag()
            reader.skip(kind)
    except IndexError:
        raise ValueError("the footer ends inside a field") from None
    raise ValueError("the footer has no num_rows")


class _ThriftCompact:
    """Just enough of Thrift's compact protocol to walk a struct's fields and skip their values
    (thrift's doc/specs/thrift-compact-protocol.md). Reading past the end raises IndexError."""

    BOOL_TRUE, BOOL_FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(1, 13)

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        self.pos += 1
        return self.buf[self.pos - 1]

    def varint(self) -> int:
        value = shift = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def fields(self):
        """(field id, type) of each field of the struct that starts here, up to its stop byte.
        The caller reads or skips each value before asking for the next field."""
        field_id = 0
        while (header := self.byte()) != 0:
            delta, kind = header >> 4, header & 0x0F
            field_id = field_id + delta if delta else self.zigzag()  # the long form: an i16 id
            yield field_id, kind

    def skip(self, kind: int, in_container: bool = False) -> None:
        if kind in (self.BOOL_TRUE, self.BOOL_FALSE):
            self.pos += in_container  # a field's bool is in its header's type; a list's takes a byte
        elif kind == self.BYTE:
            self.pos += 1
        elif kind in (self.I16, self.I32, self.I64):
            self.varint()
        elif kind == self.DOUBLE:
            self.pos += 8
        elif kind == self.BINARY:
            length = self.varint()  # not `self.pos += self.varint()`: that adds to the old pos
            self.pos += length
        elif kind in (self.LIST, self.SET):
            header = self.byte()
            n = header >> 4 if header >> 4 != 15 else self.varint()
            for _ in range(n):
                self.skip(header & 0x0F, True)
        elif kind == self.MAP:
            n = self.varint()
            types = self.byte() if n else 0
            for _ in range(n):
                self.skip(types >> 4, True)
                self.skip(types & 0x0F, True)
        elif kind == self.STRUCT:
            for _, inner in self.fields():
                self.skip(inner)
        else:
            raise ValueError(f"unknown Thrift compact type {kind}")
