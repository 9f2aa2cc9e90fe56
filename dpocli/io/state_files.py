"""Validating readers of the state files dpocli reads back: a damaged file is one `error:` line.

A run folder and its checkpoints hold JSON (run_config.json, run_record.json, trainer_state.json,
checksums.json) and torch files (optimizer.pt, trainer_state.pt). Every reader goes through
`StateFile`, which loads the file once and hands out fields by name with their expected type, so a
truncated file, bad JSON, a missing key or a value of the wrong kind is refused as
`error: FILE: field 'x' ...` (exit 2), never a KeyError or JSONDecodeError from deep inside a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dpocli.errors import DpocliError

_MISSING = object()
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object",
               list: "a list", bool: "true or false"}


@dataclass
class StateFile:
    """One state file's contents (a dict), read with the file named in every refusal."""

    path: Path
    data: dict
    hint: str | None = None

    @classmethod
    def read_json(cls, path: str | Path, hint: str | None = None) -> "StateFile":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DpocliError("is missing", file=path, hint=hint) from None
        except (OSError, UnicodeDecodeError) as err:
            raise DpocliError(f"cannot be read ({type(err).__name__}: {err})", file=path, hint=hint) from None
        try:
            data = json.loads(text)
        except ValueError as err:
            raise DpocliError(f"is not valid JSON ({err})", file=path, hint=hint) from None
        except RecursionError:
            raise DpocliError("nests lists or objects too deeply to be a dpocli state file",
                              file=path, hint=hint) from None
        return cls.of(path, data, hint)

    @classmethod
    def read_torch(cls, path: str | Path, hint: str | None = None) -> "StateFile":
        """A torch file of plain tensors, numbers and tuples (weights_only: a checkpoint is data,
        never code)."""
        import torch
        path = Path(path)
        if not path.is_file():
            raise DpocliError("is missing", file=path, hint=hint)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            first = (str(err).splitlines() or [""])[0][:200]
            raise DpocliError(f"is not a readable torch file ({type(err).__name__}: {first})",
                              file=path, hint=hint) from None
        return cls.of(path, data, hint)

    @classmethod
    def of(cls, path: Path, data, hint: str | None = None) -> "StateFile":
        if not isinstance(data, dict):
            raise DpocliError(f"holds {type(data).__name__}, not an object of named fields",
                              file=path, hint=hint)
        return cls(Path(path), data, hint)

    def get(self, name: str, kind: type | tuple = object, default=_MISSING):
        """The field `name` (dots reach into nested objects: `rng.torch`), of type `kind`."""
        value = self.data
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                if default is not _MISSING:
                    return default
                raise DpocliError("is missing", file=self.path, field=name, hint=self.hint)
            value = value[part]
        # bool is an int in Python; a field that wants an integer must not take true/false
        wrong_bool = isinstance(value, bool) and kind in (int, float)
        if wrong_bool or not isinstance(value, kind):
            raise DpocliError(f"is {type(value).__name__}, expected {self._kind_name(kind)}",
                              file=self.path, field=name, hint=self.hint)
        return value

    def count(self, name: str, default=_MISSING) -> int:
        """A non-negative integer field (a step, a position, a count)."""
        value = self.get(name, int, default)
        if value is not default and value < 0:
            raise DpocliError(f"is {value}, expected a count >= 0", file=self.path, field=name,
                              hint=self.hint)
        return value

    def refuse(self, message: str, field: str | None = None) -> DpocliError:
        """An error about this file (the caller raises it)."""
        return DpocliError(message, file=self.path, field=field, hint=self.hint)

    @staticmethod
    def _kind_name(kind) -> str:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        return " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
