"""Read preference pairs from JSON Lines, Parquet or Arrow files and validate them into `Example`s.

Invariants:
- Every returned `Example` has a non-blank prompt, and chosen and rejected of the same kind: three
  strings (standard) or three non-empty lists of messages (conversational). A completion may be
  empty or blank (TRL scores its EOS / end of turn alone); a reply may be all reasoning. Messages
  keep every key, with the shape TRL's Arrow-backed rows give them (`messages.unify_column`), plus
  the row's `tools` and `chat_template_kwargs`: everything TRL hands to the chat template.
- Only the files of one split are read (`sources.resolve_input`); columns that TRL does not read
  either are named in a warning, never dropped silently; image columns are refused.
- `Example.id` is unique within one `read_examples` call. `source_row` is the row's 0-based position
  in the whole input (files in name order, rows in order), dropped rows included, so later stages
  can restore input order after sorting by length.
- The first problem stops reading with one `DpocliError` whose single line names file, 1-based row
  and field. Nothing is written anywhere, so a failed read has no side effects. A well-formed row
  that cannot be used (`UnusableRow`) is skipped and counted instead when `strict` is off.
- No torch / transformers import: reading and validating data stays cheap and model-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from dpocli.data import chat
from dpocli.data.chat import type_name as _type_name
from dpocli.data.rows import Columns, iter_columnar, iter_jsonl, missing_column
from dpocli.data.sources import (
    DEFAULT_SPLIT,
    JSONL_SUFFIXES,
    list_input_files,  # noqa: F401 (its old home: callers import it from here)
    resolve_input,
)
from dpocli.errors import DpocliError, UnusableRow
from dpocli.io.atomic import sha256_file

Message = dict  # {"role": str, "content": str | None, ...}: every key is kept (see messages.py)

EMPTY_PROMPT = "empty_prompt"  # UnusableRow reasons found while reading (see messages.py for one more)
NO_COMMON_PREFIX = "no_common_prefix"


@dataclass(frozen=True)
class Example:
    """One validated preference pair. `file`/`row` (1-based) are kept for later error messages."""

    id: str
    source_row: int
    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    conversational: bool
    file: str
    row: int
    tools: list | None = None  # passed to apply_chat_template as `tools=` (conversational rows)
    chat_template_kwargs: dict | None = None  # spread into apply_chat_template (conversational rows)


@dataclass(frozen=True)
class InputFile:
    """A file that was read, with the fingerprint that goes into the cache manifest."""

    path: str
    size: int
    sha256: str
    rows: int


@dataclass
class ReadResult:
    """Everything `read_examples` found. `rows_read` counts dropped rows; `dropped` maps reason -> count."""

    examples: list[Example]
    files: list[InputFile]
    rows_read: int
    dropped: dict[str, int]
    warnings: list[str]
    split: str | None = None  # the split read; None when the input has no splits




def extract_prompt(chosen, rejected):
    """Split the common prefix of `chosen` and `rejected` off as the prompt, exactly as TRL does.

    Same loop as `trl.data_utils._extract_prompt`, for strings and message lists alike. A space just
    before the first difference stays with the completions ("Q: hi A: yes" / "Q: hi A: no" gives
    prompt "Q: hi A:", completions " yes" / " no"). TRL's quirks are kept for parity: when one side is
    a prefix of the other (or both are equal) the split falls before the last element of the shorter.
    One deliberate difference: TRL reads `chosen[-1]` when the first element already differs; here that
    case returns an empty prompt, which the caller refuses.

    Returns:
        (prompt, chosen_completion, rejected_completion)
    """
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def read_examples(path, *, prompt_column="prompt", chosen_column="chosen", rejected_column="rejected",
                  id_column: str | None = None, drop_identical: bool = False,
                  max_row_bytes: int = 16 * 2**20, split: str = DEFAULT_SPLIT,
                  subset: str | None = None, strict: bool = True) -> ReadResult:
    """Read and validate every row of `split` (of README config `subset`) under `path` (see
    `sources.resolve_input`).

    The prompt is implicit (TRL's `extract_prompt`) for rows without `prompt_column`. Ids come from
    `id_column`, else an "id" column when present, else a content hash (see `_IdAssigner`).
    Rows whose chosen equals rejected are kept with a warning, or dropped with `drop_identical`.
    A row that is well-formed but unusable (an `UnusableRow`: a blank prompt, no common prefix to
    infer one from, an empty message list) is the error when `strict`, else skipped and counted by
    reason in `dropped`, with one warning per reason naming the first such row.

    Raises:
        DpocliError: at the first invalid row or file, naming file, row and field.
    """
    columns = Columns(prompt_column, chosen_column, rejected_column, id_column)
    source = resolve_input(path, split, subset)
    records, files, warnings = _read_records(source.files, columns, max_row_bytes)
    if not records:
        raise DpocliError("input has no rows (expected at least one preference pair)", file=path)
    examples, identical, extras_ignored, skipped = _validate(records, columns, drop_identical, strict)
    if extras_ignored:
        warnings.append(f"{extras_ignored} plain-text row(s) have '{chat.TOOLS_COLUMN}' or "
                        f"'{chat.KWARGS_COLUMN}': ignored, as TRL does (only message lists use a "
                        "chat template)")
    if identical and drop_identical:
        warnings.append(f"dropped {identical} row(s) with chosen identical to rejected")
    elif identical:
        rows_have = "1 row has" if identical == 1 else f"{identical} rows have"
        warnings.append(f"{rows_have} chosen identical to rejected (kept; use --drop-identical to drop them)")
    for reason, (n, first) in skipped.items():
        warnings.append(f"skipped {n} row(s), {reason} (first: {first}); they are counted in the "
                        "manifest, and --strict makes them errors")
    dropped = {"identical_chosen_rejected": identical} if drop_identical and identical else {}
    dropped.update((reason, n) for reason, (n, _) in skipped.items())
    if not examples:
        reasons = ", ".join(f"{reason} {n}" for reason, n in dropped.items())
        raise DpocliError(f"all {len(records)} rows were dropped ({reasons})", file=path)
    return ReadResult(examples, files, len(records), dropped, warnings, source.split)


def _read_records(paths, columns: Columns, max_row_bytes: int) -> tuple[list, list, list]:
    """((loc, record) of every row in input order, the files read, warnings). All rows are read
    before any is validated: like TRL's Arrow table, a message's keys depend on the whole column."""
    files: list[InputFile] = []
    warnings: list[str] = []
    records: list[tuple[dict, dict]] = []
    ignored: dict[str, None] = {}
    for file_path in paths:
        reader = (iter_jsonl if file_path.name.lower().endswith(JSONL_SUFFIXES) else iter_columnar)
        first = len(records)
        for row, record in reader(file_path, columns, max_row_bytes, warnings, ignored):
            records.append(({"file": str(file_path), "row": row}, record))
        if len(records) == first:
            warnings.append(f"{file_path}: file has no rows")
        files.append(InputFile(str(file_path), file_path.stat().st_size, sha256_file(file_path),
                               len(records) - first))
    for name in (columns.prompt, columns.chosen, columns.rejected, chat.TOOLS_COLUMN, chat.KWARGS_COLUMN):
        _unify(records, name)
    if ignored:
        warnings.append("column(s) not used, and not rendered by TRL's DPOTrainer either: "
                        + ", ".join(ignored))
    return records, files, warnings


def _validate(records: list, columns: Columns, drop_identical: bool, strict: bool) -> tuple:
    """(examples kept, rows with chosen == rejected, plain-text rows whose chat extras were ignored,
    reason -> [count, first error] of the unusable rows skipped)."""
    ids = _IdAssigner()
    examples: list[Example] = []
    identical = extras_ignored = 0
    skipped: dict[str, list] = {}
    for source_row, (loc, record) in enumerate(records):
        try:
            conversational, prompt, chosen, rejected = _parse_row(record, columns, loc)
        except UnusableRow as e:
            if strict:
                raise
            skipped.setdefault(e.reason, [0, e])[0] += 1
            continue
        tools = chat.parse_tools(record.get(chat.TOOLS_COLUMN), loc)
        kwargs = chat.parse_template_kwargs(record.get(chat.KWARGS_COLUMN), loc)
        if not conversational:
            # TRL renders only message lists with a template; plain-text rows ignore both columns.
            extras_ignored += bool(tools is not None or chat.without_nulls(kwargs))
            tools, kwargs = None, {}
        extras = {"tools": tools, "chat_template_kwargs": kwargs or None}
        # Ids are assigned before dropping, so a duplicate id is an error whatever the flags.
        example_id = ids.assign(record, columns.id, (prompt, chosen, rejected), extras, loc)
        example = Example(example_id, source_row, prompt, chosen, rejected, conversational, **loc, **extras)
        same = chat.without_nulls(chosen) == chat.without_nulls(rejected)
        identical += same
        if not (drop_identical and same):
            examples.append(example)
    return examples, identical, extras_ignored, skipped


def _unify(records: list[tuple[dict, dict]], name: str) -> None:
    """Give column `name` the shape TRL's Arrow rows have (see `messages.unify_column`)."""
    present = [record for _, record in records if isinstance(record.get(name), (list, dict))]
    for record, value in zip(present, chat.unify_column([r[name] for r in present])):
        record[name] = value


# --- readers: yield (1-based row, record dict), raising on anything that is not a JSON/Parquet row ---











# --- validation of one row ---

def _parse_row(record: dict, columns: Columns, loc: dict):
    """Return (conversational, prompt, chosen, rejected) for a valid row, else raise naming the field."""
    _require(record, columns.chosen, "--chosen-column", loc)
    _require(record, columns.rejected, "--rejected-column", loc)
    present = [name for name in (columns.chosen, columns.rejected, columns.prompt) if name in record]
    # A completion may be empty or blank (TRL appends EOS and scores it); a prompt may not.
    checked = {name: _check_field(record[name], loc, name, name != columns.prompt) for name in present}
    conversational = checked[columns.chosen][0]
    repeated = _prompt_repeated_in_messages(checked, columns)
    if repeated is not None:
        return (True, *repeated)
    for name, (kind, _) in checked.items():
        if kind != conversational:
            describe = {False: "a string", True: "a message list"}
            raise DpocliError(f"is {describe[kind]} but '{columns.chosen}' is {describe[conversational]} "
                              "(a row must be all strings or all message lists)", field=name, **loc)
    chosen, rejected = checked[columns.chosen][1], checked[columns.rejected][1]
    if columns.prompt in checked:
        return conversational, checked[columns.prompt][1], chosen, rejected

    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    # An empty or blank completion is kept (HH-RLHF has empty replies; TRL scores the EOS alone).
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        pair = f"'{columns.chosen}' and '{columns.rejected}'"
        raise UnusableRow(NO_COMMON_PREFIX, f"is absent and {pair} share no common prefix to infer it from",
                          field=columns.prompt, **loc,
                          hint="add a prompt column, or pass --prompt-column NAME if it has another name")
    return conversational, prompt, chosen, rejected


def _prompt_repeated_in_messages(checked: dict, columns: Columns):
    """UltraFeedback-binarized shape: `prompt` is a string while `chosen`/`rejected` are full
    conversations that begin with that prompt as a user turn. Returns (prompt messages, chosen
    reply, rejected reply) when the row has that shape, else None (the caller then reports the
    mixed kinds). The shared leading turns become the prompt, as TRL's implicit-prompt rule does."""
    if columns.prompt not in checked or checked[columns.prompt][0] or not checked[columns.chosen][0] \
            or not checked[columns.rejected][0]:
        return None
    text = checked[columns.prompt][1]
    prompt, chosen, rejected = extract_prompt(checked[columns.chosen][1], checked[columns.rejected][1])
    users = [m["content"] for m in prompt if m["role"] == "user"]
    if not users or (users[-1] or "").strip() != text.strip() or not chosen or not rejected:
        return None
    return prompt, chosen, rejected


def _check_field(value, loc: dict, field: str, may_be_empty: bool):
    """Return (conversational, value) for a string (non-blank unless `may_be_empty`: a completion)
    or a message list, else raise."""
    if isinstance(value, str):
        if not value.strip() and not may_be_empty:
            raise UnusableRow(EMPTY_PROMPT, "is empty (expected non-empty text)" if not value else
                              "is whitespace-only (expected non-empty text)", field=field, **loc)
        return False, value
    if isinstance(value, list):
        return True, chat.check_messages(value, loc, field)
    raise DpocliError(f"must be a string or a list of {{role, content}} messages, got {_type_name(value)}",
                      field=field, **loc)


def _require(record: dict, name: str, flag: str, loc: dict):
    if name not in record:
        raise missing_column(name, flag, record.keys(), loc)
    return record[name]


class _IdAssigner:
    """Hands out unique ids in input order.

    Explicit ids must be unique (a duplicate names both rows). Without one, the id is the first 16 hex
    chars of sha256 over the canonical JSON of {prompt, chosen, rejected} (after implicit-prompt
    extraction, null message keys left out; plus tools / chat_template_kwargs when the row has them),
    so the same pair gets the same id from JSONL or Parquet;
    exact duplicate pairs get "-2", "-3", ... in input order.
    """

    def __init__(self) -> None:
        self.first_seen: dict[str, tuple[str, int]] = {}
        self.hash_counts: dict[str, int] = {}

    def assign(self, record: dict, id_column: str | None, content: tuple, extras: dict, loc: dict) -> str:
        field = id_column or ("id" if "id" in record else None)
        if field:
            new_id = _require(record, field, "--id-column", loc)
            # bool is an int subclass, but `true` as an id is a data bug, not an id.
            if isinstance(new_id, bool) or not isinstance(new_id, (str, int)) or not str(new_id).strip():
                raise DpocliError(f"must be a non-empty string or an int, got {_type_name(new_id)} "
                                  f"{json.dumps(new_id)[:40]}", field=field, **loc)
            new_id = str(new_id)
        else:
            prompt, chosen, rejected = content
            # Nulls are left out (they depend on other rows, see messages.unify_column), and so are
            # absent tools / template arguments, so rows without them keep the ids they always had.
            pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                    **{k: v for k, v in extras.items() if v is not None}}
            canonical = json.dumps(chat.without_nulls(pair), sort_keys=True, ensure_ascii=False,
                                   separators=(",", ":"))
            # surrogatepass: JSON may carry lone "\ud800" escapes; they must hash, not crash.
            base = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            count = self.hash_counts[base] = self.hash_counts.get(base, 0) + 1
            new_id = base if count == 1 else f"{base}-{count}"
        if new_id in self.first_seen:
            first_file, first_row = self.first_seen[new_id]
            raise DpocliError(f"duplicate id {new_id!r} (first seen at {first_file}:{first_row})",
                              field=field or "id", **loc)
        self.first_seen[new_id] = (loc["file"], loc["row"])
        return new_id


# --- small helpers ---









