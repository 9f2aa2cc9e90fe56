"""Find the data files behind an input path, and the split each belongs to (Hub dataset layouts).

A folder is read as the first of these layouts that it has:

1. `dataset_dict.json` (`DatasetDict.save_to_disk`): one subfolder of Arrow files per split.
2. `README.md` whose YAML front matter has `configs` (the Hub's `data_files` per split, globs).
3. Data files in the folder itself, else in its `data/` subfolder, else in split-named subfolders
   (`train/`, `test/`). A file's split comes from its name as the Hub reads it: a split keyword
   between separators (`train-00000-of-00002.parquet`, `test.jsonl`, `my_dev_set.jsonl`). Files
   whose names carry no keyword form one unnamed input, read as before splits existed.

Invariants:
- Files of different splits are never merged, and files of a split other than the requested one
  are never opened (only their names are looked at).
- A requested split that the input lacks, a folder that mixes split-named and unnamed files, or an
  ambiguous README is refused with one `DpocliError` listing what was found.
- Subfolders are searched only by the layouts above: a stray backup folder never leaks in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from dpocli.errors import DpocliError

JSONL_SUFFIXES = (".jsonl", ".json-lines", ".jsonlines", ".ndjson")
JSONL_SUFFIXES += tuple(suffix + ".gz" for suffix in JSONL_SUFFIXES)  # read through gzip
PARQUET_SUFFIXES = (".parquet",)
# A folder written by HF `datasets.save_to_disk` holds Arrow IPC stream files (data-0000X-of-N.arrow);
# pyarrow reads them directly, so the `datasets` package is not needed.
ARROW_SUFFIXES = (".arrow",)
DEFAULT_SPLIT = "train"

# The Hub's split keywords (datasets' `data_files.SPLIT_KEYWORDS`), each alias -> canonical name.
_SPLIT_ALIASES = {alias: split for split, aliases in {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}.items() for alias in aliases}
_SPLIT_ORDER = ("train", "validation", "test")  # the Hub's precedence when a name has two keywords
_SEPARATORS = re.compile(r"[-._ 0-9]+")  # what may surround a keyword in a file name (as on the Hub)


@dataclass(frozen=True)
class InputSource:
    """The files to read, in order. `split` is None when the input has no splits."""

    files: list[Path]
    split: str | None
    layout: str  # "file", "folder", "split-files", "readme-configs", "save_to_disk-dict"


def is_data_file(path: Path) -> bool:
    return path.name.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES)


def resolve_input(path, split: str = DEFAULT_SPLIT, subset: str | None = None) -> InputSource:
    """The files of `split` under `path` (see the module docstring for the layouts), from the
    README.md config named `subset` when given (else the README's default config).

    A single file, or a folder whose files name no split, has no splits: it is read whole, and
    only the default split may be asked for (any other is refused rather than ignored). A `subset`
    is refused unless the folder's README.md lists configs.
    """
    path = Path(path)
    wanted = _SPLIT_ALIASES.get(split.lower(), split)
    if not path.exists():
        raise DpocliError("does not exist", file=path)
    if not path.is_dir() and not path.is_file():  # reading a FIFO would block, and it is read twice
        raise DpocliError("is not a regular file or a folder (a FIFO, socket or device); dpocli reads "
                          "its input twice (the rows, then a checksum)", file=path,
                          hint="save the data to a file first")
    saved = path.is_dir() and (path / "dataset_dict.json").is_file()
    configs = _readme_splits(path, subset) if path.is_dir() and not saved else None
    if configs is not None:
        return _pick(path, configs, wanted, "readme-configs")
    if subset is not None:
        raise DpocliError(f"has no README.md with configs, so --subset {subset} cannot be honoured",
                          file=path, field="--subset",
                          hint="drop --subset, or pass the folder of that config")
    if not path.is_dir():
        if not is_data_file(path):
            raise DpocliError("is not a JSON Lines (.jsonl) or Parquet (.parquet) file", file=path,
                              hint="convert it to JSON Lines: one {\"prompt\", \"chosen\", \"rejected\"} "
                                   "object per line")
        return _unsplit(InputSource([path], None, "file"), split, path)
    if saved:
        return _pick(path, _save_to_disk_splits(path), wanted, "save_to_disk-dict")

    for folder in (path, path / "data"):
        files = _data_files(folder)
        if files:
            break
    else:
        split_dirs = {}
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            if sub.name.lower() in _SPLIT_ALIASES and _data_files(sub):
                split_dirs.setdefault(_SPLIT_ALIASES[sub.name.lower()], []).extend(_data_files(sub))
        if split_dirs:
            return _pick(path, split_dirs, wanted, "split-folders")
        raise DpocliError("folder has no .jsonl, .parquet or .arrow (HF save_to_disk) files", file=path,
                          hint="pass a data file, or the folder that holds them (other subfolders than "
                               "data/ and split-named ones are not searched)")
    named = {f: _split_of(f.name) for f in files}
    if not any(named.values()):
        return _unsplit(InputSource(files, None, "folder"), split, path)
    unnamed = [f.name for f, s in named.items() if s is None]
    if unnamed:
        found = ", ".join(sorted({s for s in named.values() if s}))
        raise DpocliError(f"folder mixes files named by split ({found}) with files that name none "
                          f"({', '.join(unnamed[:3])}): their split is unknown", file=folder,
                          hint="rename them (e.g. train-extra.jsonl) or move them to another folder")
    splits: dict[str, list[Path]] = {}
    for f, s in named.items():
        splits.setdefault(s, []).append(f)
    return _pick(path, splits, wanted, "split-files")


def list_input_files(path, split: str = DEFAULT_SPLIT, subset: str | None = None) -> list[Path]:
    """The data files `read_examples` reads for `path`, `split` and `subset`, in reading order."""
    return resolve_input(path, split, subset).files


# --- layouts ---

def _data_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and is_data_file(p)), key=lambda p: p.name)


def _split_of(name: str) -> str | None:
    """The split a file name announces, as the Hub reads it: a keyword between separators."""
    lower = name.lower()
    stem = next((lower[:-len(s)] for s in JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
                 if lower.endswith(s)), lower)
    words = {_SPLIT_ALIASES.get(w.lower()) for w in _SEPARATORS.split(stem)} - {None}
    return next((s for s in _SPLIT_ORDER if s in words), None)


def _save_to_disk_splits(path: Path) -> dict[str, list[Path]]:
    try:
        names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise DpocliError(f"is not a readable DatasetDict index ({type(e).__name__}: {e})",
                          file=path / "dataset_dict.json") from None
    splits = {}
    for name in names:
        folder = path / str(name)
        files = _arrow_files_in_order(folder)
        if not files:
            raise DpocliError(f"split '{name}' listed in dataset_dict.json has no .arrow files", file=folder)
        splits[str(name)] = files
    return splits


def _arrow_files_in_order(folder: Path) -> list[Path]:
    """A saved Dataset's shards in the order its state.json lists them (name order without one)."""
    state = folder / "state.json"
    if state.is_file():
        try:
            state_files = json.loads(state.read_text(encoding="utf-8"))["_data_files"]
            listed = [folder / f["filename"] for f in state_files]
            if listed and all(p.is_file() for p in listed):
                return listed
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            pass  # fall back to name order, which is what save_to_disk writes anyway
    return [p for p in _data_files(folder) if p.name.endswith(ARROW_SUFFIXES)]


def _readme_splits(path: Path, subset: str | None = None) -> dict[str, list[Path]] | None:
    """Split -> files of config `subset` (default: the default one) from README.md's `configs`
    (None when there is no such block)."""
    readme = path / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return None
    import yaml  # a dependency of transformers; imported here so plain file inputs never need it
    try:
        meta = yaml.safe_load(match.group(1))
    except RecursionError:
        raise DpocliError("has front matter nested too deeply to read", file=readme) from None
    except yaml.YAMLError as e:
        raise DpocliError(f"has front matter that is not valid YAML ({str(e).splitlines()[0]})",
                          file=readme) from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not configs:
        return None
    config = _pick_config(configs, readme, subset)
    data_files = config.get("data_files")
    if isinstance(data_files, (str, list)) and not (isinstance(data_files, list) and data_files
                                                   and isinstance(data_files[0], dict)):
        data_files = [{"split": DEFAULT_SPLIT, "path": data_files}]  # the Hub's rule: no split named = train
    if not isinstance(data_files, list) or not all(isinstance(d, dict) and "path" in d for d in data_files):
        raise DpocliError("config has no data_files (expected a list of {split, path})",
                          file=readme, field="configs")
    splits = {}
    for entry in data_files:
        name = str(entry.get("split", DEFAULT_SPLIT))
        patterns = [entry["path"]] if isinstance(entry["path"], str) else list(entry["path"])
        files = []
        for pattern in patterns:
            matched = sorted(p for p in path.glob(str(pattern)) if p.is_file())
            if not matched:
                raise DpocliError(f"split '{name}': pattern '{pattern}' matches no file", file=readme,
                                  field="configs")
            unsupported = [p.name for p in matched if not is_data_file(p)]
            if unsupported:
                raise DpocliError(f"split '{name}': {unsupported[0]} is not JSON Lines, Parquet or Arrow",
                                  file=readme, field="configs",
                                  hint="convert the split to .jsonl or .parquet")
            files += matched
        splits.setdefault(name, []).extend(dict.fromkeys(files))  # dict: a file matched twice is read once
    return splits


def _pick_config(configs, readme: Path, subset: str | None) -> dict:
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise DpocliError("is not a list of {config_name, data_files}", file=readme, field="configs")
    names = ", ".join(str(c.get("config_name")) for c in configs)
    if subset is not None:
        named = [c for c in configs if str(c.get("config_name")) == subset]
        if not named:
            raise DpocliError(f"lists no config '{subset}' (configs: {names})", file=readme, field="--subset",
                              hint="pass --subset with one of the configs listed")
        return named[0]
    chosen = ([c for c in configs if c.get("default") is True] or
              [c for c in configs if c.get("config_name") == "default"] or
              (configs if len(configs) == 1 else []))
    if len(chosen) != 1:
        raise DpocliError(f"lists several configs ({names}) and none is the default", file=readme,
                          field="configs", hint="pass --subset with the config you want")
    return chosen[0]


def _pick(path: Path, splits: dict[str, list[Path]], wanted: str, layout: str) -> InputSource:
    if wanted not in splits:
        raise DpocliError(f"has no split '{wanted}' (splits found: {', '.join(sorted(splits))})", file=path,
                          field="--split", hint="pass --split with one of the splits found")
    return InputSource(list(splits[wanted]), wanted, layout)


def _unsplit(source: InputSource, split: str, path: Path) -> InputSource:
    if split != DEFAULT_SPLIT:
        raise DpocliError(f"has no splits, so --split {split} cannot be honoured", file=path, field="--split",
                          hint="drop --split, or name the files by split (train-*.jsonl, test-*.jsonl)")
    return source
