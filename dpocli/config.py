"""`--config run.toml` for every command, `--print-config`, and the resolved config of a run.

A config file holds command options by their flag names (`max-steps = 100` or `max_steps = 100`),
either at the top level or under a table named after the command (`[train]`, `[precompute-ref]`,
`[eval]`), so one file can serve a whole pipeline. Values from the file become the command's
defaults; flags given on the command line still win. The resolved options of a run are written
back as TOML in the same form, so `--config RUN_DIR/config.resolved.toml` replays it.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dpocli.errors import DpocliError

if TYPE_CHECKING:  # typer >= 0.29 vendors click (typer._click) and no longer installs it
    import click

SKIP = {"help", "config", "print_config"}


def _toml_load(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the optional `tomli` backport (same API)
        try:
            import tomli as tomllib
        except ImportError:
            raise DpocliError("reading TOML on Python 3.10 needs the tomli package", file=path,
                              hint="pip install tomli") from None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DpocliError("no such config file", file=path, field="--config") from None
    except IsADirectoryError:
        raise DpocliError("is a folder, not a TOML file", file=path, field="--config") from None
    except OSError as err:
        raise DpocliError(f"cannot be read ({err.strerror})", file=path, field="--config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DpocliError(f"is not valid TOML ({err})", file=path, field="--config") from None


def _flag_names(command: click.Command) -> dict[str, str]:
    """Every spelling a config key may use -> the click parameter name."""
    names = {}
    for param in command.params:
        if param.name in SKIP:
            continue
        names[param.name] = param.name
        names[param.name.replace("_", "-")] = param.name
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                names[opt[2:]] = param.name
                names[opt[2:].replace("-", "_")] = param.name
    return names


def config_defaults(
    command: click.Command, command_name: str, path: Path, *, shown: str | None = None
) -> dict:
    """Map a TOML file to click's `default_map` for `command`. `command_name` is the table the
    command reads (`[train]`, `[info]`); `shown` names the command in messages (`cache info`)."""
    shown = shown or command_name
    data = _toml_load(path)
    table = data.get(command_name, {})
    if not isinstance(table, dict):
        raise DpocliError(f"[{command_name}] must be a table", file=path, field=command_name)
    shared_file = any(isinstance(v, dict) for v in data.values())
    # Top-level keys apply to every command; the command's own table overrides them. In a file
    # with several command tables, a top-level key another command lacks is simply not ours.
    section = {k: v for k, v in data.items() if not isinstance(v, dict)}
    names = _flag_names(command)
    if shared_file:
        section = {k: v for k, v in section.items() if k in names}
    section.update(table)
    mapped = {}
    for key, value in section.items():
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=1)
            raise DpocliError(f"is not an option of `dpo {shown}`", file=path, field=key,
                              hint=f"did you mean '{close[0]}'?" if close else
                              f"see `dpo {shown} --help`")
        mapped[names[key]] = value
    return mapped



def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def to_toml(command: click.Command, values: dict, title: str) -> str:
    """TOML of a command's options (flag names as keys); unset (None) options are commented out."""
    lines = [f"# {title}"]
    for param in command.params:
        if param.name in SKIP or param.name not in values:
            continue
        key = next((o[2:] for o in getattr(param, "opts", []) if o.startswith("--")), param.name)
        if param.param_type_name == "argument":  # not isinstance: typer's click may be its own copy
            key = param.name
        value = values[param.name]
        if value is None or value == [] or value == ():
            lines.append(f"# {key} =")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
