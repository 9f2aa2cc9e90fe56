"""`--config run.toml` for every command, `--print-config`, and the resolved config of a run.

A config file holds command options by their flag names (`max-steps = 100` or `max_steps = 100`),
either at the top level or under a table named after the command (`[train]`, `[precompute-ref]`,
`[eval]`), so one file can serve a whole pipeline. Values from the file become the command's
defaults; flags given on the command line still win. A file cannot lie: every key must be an
option (of this command, or at the top level of a shared file of some command), typed as its flag
takes it (no `true` for an integer, no table for a value), and given once per table. The resolved
options of a run are written back as TOML in the same form, so `--config RUN_DIR/config.resolved.toml`
replays it.
"""

from __future__ import annotations

import difflib
import json
import sys
import typing
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
    if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO would block the read
        raise DpocliError("is not a regular file (a FIFO, socket or device)", file=path, field="--config")
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
    except RecursionError:
        raise DpocliError("nests arrays or tables too deeply to read", file=path, field="--config") from None


def _flag_names(command: click.Command) -> dict[str, click.Parameter]:
    """Every spelling a config key may use -> the click parameter."""
    names = {}
    for param in command.params:
        if param.name in SKIP:
            continue
        names[param.name] = param
        names[param.name.replace("_", "-")] = param
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                names[opt[2:]] = param
                names[opt[2:].replace("-", "_")] = param
    return names


def _annotation(param: click.Parameter):
    """The type the command line converts the flag's text to (typer's annotation, else click's)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return descriptor.annotation
    kind = getattr(getattr(param, "type", None), "name", "text")
    simple = {"integer": int, "float": float, "boolean": bool}.get(kind, str)
    return list[simple] if getattr(param, "multiple", False) or getattr(param, "nargs", 1) == -1 else simple


def _typed_as_flag(value, annotation) -> bool:
    """TOML `value` has the type the flag takes: true/false only for a switch, an integer (never a
    boolean, never 1.0) for an integer option, a number for a float one, a string for a text or
    path one, and an array of those for a repeatable one."""
    if typing.get_origin(annotation) in (list, tuple):
        inner = (typing.get_args(annotation) or (str,))[0]
        return isinstance(value, list) and all(_typed_as_flag(v, inner) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if annotation is int:
        return isinstance(value, int)
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, str)


_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _check_section(section: dict, names: dict, path: Path, table: str, shown: str) -> dict:
    """{parameter name: value} of one table: every key an option of `dpo shown`, typed as its flag,
    given once (`max-steps` and `max_steps` are one option)."""
    mapped, spelled = {}, {}
    for key, value in section.items():
        field = f"{table}.{key}" if table else key  # the TOML dotted key
        param = names.get(key)
        if param is None:
            close = difflib.get_close_matches(key, list(names), n=1)
            raise DpocliError(f"is not an option of `dpo {shown}`", file=path, field=field,
                              hint=f"did you mean '{close[0]}'?" if close else f"see `dpo {shown} --help`")
        if param.name in spelled:
            raise DpocliError(f"sets the option twice, as '{spelled[param.name]}' and '{key}'",
                              file=path, field=field, hint="keep one of them")
        annotation = _annotation(param)
        repeatable = typing.get_origin(annotation) in (list, tuple)
        if repeatable and isinstance(value, str):
            value = [value]  # `model = "x"`, as `--model x` on the command line
        if not _typed_as_flag(value, annotation):
            inner = (typing.get_args(annotation) or (str,))[0]
            wanted = (f"a string or an array of {_PLURAL.get(inner, 'strings')}" if repeatable
                      else _KIND.get(annotation, "a string"))
            flag = next((o for o in getattr(param, "opts", []) if o.startswith("--")), "the option")
            raise DpocliError(f"is {_toml_kind(value)}, but {flag} takes {wanted}",
                              file=path, field=field, hint=f"see `dpo {shown} --help`")
        spelled[param.name] = key
        mapped[param.name] = value
    return mapped


def _toml_kind(value) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"[:60]


def config_defaults(
    command: click.Command, command_name: str, path: Path, *, shown: str | None = None,
    commands: dict[str, tuple[str, click.Command]] | None = None,
) -> dict:
    """Map a TOML file to click's `default_map` for `command`. `command_name` is the table the
    command reads (`[train]`, `[info]`); `shown` names the command in messages (`cache info`).
    `commands` maps every table name a file may hold to (its command as shown, the command): the
    whole file is checked, whichever command reads it, so a typo in any table is an error."""
    shown = shown or command_name
    commands = dict(commands or {})
    commands.setdefault(command_name, (shown, command))
    data = _toml_load(path)
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for name, table in tables.items():
        if name not in commands:
            raise DpocliError(f"is a table, and there is no command `dpo {name}`; tables are named after "
                              f"commands ({', '.join('[' + n + ']' for n in sorted(commands))}) and "
                              "option values are never tables", file=path, field=name)
        table_shown, table_command = commands[name]
        _check_section(table, _flag_names(table_command), path, name, table_shown)
    # Top-level keys apply to every command; the command's own table overrides them. In a file
    # with command tables, a top-level key may be an option of another command (not ours then),
    # but it must be some command's option, typed as each such command's flag.
    others = {name: _flag_names(c) for name, (_, c) in commands.items() if name != command_name}
    names = _flag_names(command)
    mine = {}
    for key, value in top.items():
        owners = [name for name, flags in others.items() if key in flags] if tables else []
        if key in names or not tables or not owners:
            mine[key] = value
        for name in owners:
            _check_section({key: value}, others[name], path, "", commands[name][0])
    mapped = _check_section(mine, names, path, "", shown)
    mapped.update(_check_section(tables.get(command_name, {}), names, path, command_name, shown))
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
