"""Validate the chat parts of a row (messages, `tools`, `chat_template_kwargs`) into what TRL 1.16
passes to `apply_chat_template`.

What TRL passes, and so what dpocli keeps:
- Each message dict whole: every key (`tool_calls`, `name`, `tool_call_id`, `reasoning_content`, ...),
  not only role and content, because any key may be read by a chat template.
- The `tools` column as `tools=` (a JSON string is decoded first), and the `chat_template_kwargs`
  dict spread as keyword arguments after it (so a `tools` key there wins, as in TRL).
- TRL's rows come out of an Arrow table, whose struct columns hold the union of the keys seen in the
  column, in first-seen order, with null where a row lacks one. `unify_column` rebuilds that shape
  for JSON Lines input, so a template sees `{"city": "Paris", "unit": null}` exactly as under TRL.

Refused (exit 2): images and multimodal content parts (no text-only training on image rows), a
message without a role, content that is neither text nor null, an empty message list, and keyword
arguments that TRL itself would crash on. Empty or null content is kept, as TRL keeps it: an empty
reply is a reply (the template's end of turn is scored), a reply may be all reasoning
(`reasoning_content`), and whether a null content renders is the template's business (tokenization
refuses or skips a row whose template fails on it, or leaves out what the row gave). No torch /
transformers import.
"""

from __future__ import annotations

import json

from dpocli.errors import DpocliError, UnusableRow

EMPTY_MESSAGE_LIST = "empty_message_list"  # an UnusableRow reason (skipped and counted by precompute)
IMAGE_COLUMNS = ("image", "images")  # TRL treats a row with either key as a vision example
TOOLS_COLUMN = "tools"
KWARGS_COLUMN = "chat_template_kwargs"
# apply_chat_template arguments TRL sets itself: the same key in chat_template_kwargs makes TRL's
# call fail ("got multiple values for keyword argument"), so such a row has no TRL ids to match.
_RESERVED_KWARGS = ("conversation", "tokenize", "return_dict", "add_generation_prompt")
# Message keys that carry a reply's reasoning in thinking-model data (Qwen3 and DeepSeek-R1 use the
# first; gpt-oss style data the last): text the row gave, which the template must render.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def unify_column(values: list) -> list:
    """`values` as an Arrow struct column returns them: every dict (at any depth) carries the union of
    the keys found at its place in the column, in first-seen order, null where absent. Scalars and
    mismatched shapes are left as they are."""
    schema = None
    for value in values:
        schema = _merge(schema, value)
    return [_fill(value, schema) for value in values]


def _merge(schema, value):
    if isinstance(value, dict):
        merged = dict(schema) if isinstance(schema, dict) else {}
        for key, item in value.items():
            merged[key] = _merge(merged.get(key), item)
        return merged if schema is None or isinstance(schema, dict) else schema
    if isinstance(value, list):
        element = schema[1] if isinstance(schema, tuple) else None
        for item in value:
            element = _merge(element, item)
        return ("list", element) if schema is None or isinstance(schema, tuple) else schema
    return schema


def _fill(value, schema):
    if isinstance(value, dict) and isinstance(schema, dict):
        return {key: _fill(value.get(key), sub) for key, sub in schema.items()}
    if isinstance(value, list) and isinstance(schema, tuple):
        return [_fill(item, schema[1]) for item in value]
    return value


def without_nulls(value):
    """`value` with null dict entries removed (at any depth): the row's own content, independent of
    which keys other rows added through `unify_column`. Used for ids and equality."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def check_messages(value: list, loc: dict, field: str) -> list[dict]:
    """A non-empty list of messages, each with a string role and text (possibly empty) or null
    content. Emptiness is not refused here: TRL trains on an empty reply (its end of turn) and on a
    reply that is all `reasoning_content`, and so does dpocli."""
    if not value:
        raise UnusableRow(EMPTY_MESSAGE_LIST, "is an empty list (expected at least one {role, content} "
                          "message)", field=field, **loc)
    return [_check_message(m, loc, f"{field}[{i}]") for i, m in enumerate(value)]


def _check_message(message, loc: dict, field: str) -> dict:
    if not isinstance(message, dict):
        raise DpocliError(f"must be a {{role, content}} message, got {type_name(message)}",
                          field=field, **loc)
    role = message.get("role")
    if not isinstance(role, str) or not role.strip():
        problem = f"must be a non-empty string, got {type_name(role)}" if role is not None else "is missing"
        raise DpocliError(problem + " (each message needs a string 'role' and 'content')",
                          field=f"{field}.role", **loc)
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and not (isinstance(tool_calls, list)
                                       and all(isinstance(c, dict) for c in tool_calls)):
        raise DpocliError(f"must be a list of tool-call objects, got {type_name(tool_calls)}",
                          field=f"{field}.tool_calls", **loc)
    content = message.get("content")
    if isinstance(content, list):
        kinds = sorted({str(p.get("type")) for p in content if isinstance(p, dict)})
        raise DpocliError(f"is a list of content parts ({', '.join(kinds) or 'untyped'}); multimodal "
                          "messages are not supported (text-only training would silently ignore the images)",
                          field=f"{field}.content", **loc, hint="write text-only content as one string")
    if content is not None and not isinstance(content, str):
        raise DpocliError(f"must be a string or null, got {type_name(content)} (each message needs a "
                          "string 'content', or 'tool_calls' instead)", field=f"{field}.content", **loc)
    if "content" not in message and not tool_calls and not any(message.get(k) for k in REASONING_KEYS):
        # No message of the column has the key (else it would be null here, as in TRL's Arrow rows):
        # the text is under another name, and every turn would render empty.
        raise DpocliError("is missing (each message needs a string 'content', or 'tool_calls' instead)",
                          field=f"{field}.content", **loc)
    return message


def parse_tools(value, loc: dict, field: str = TOOLS_COLUMN) -> list | None:
    """The `tools` value TRL passes on: None, or a list of tool (JSON schema) objects; a JSON string
    is decoded first, as TRL does."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DpocliError(f"is a string but not valid JSON ({e.msg} at character {e.pos + 1})",
                              field=field, **loc) from None
        except RecursionError:
            raise DpocliError("is a string of JSON nested too deeply to read", field=field, **loc) from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DpocliError(f"must be a list of tool objects (or a JSON string of one), got {type_name(value)}",
                          field=field, **loc)
    return value


def parse_template_kwargs(value, loc: dict, field: str = KWARGS_COLUMN) -> dict:
    """The extra `apply_chat_template` keyword arguments of one row (null means none)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DpocliError(f"must be an object of chat template arguments, got {type_name(value)}",
                          field=field, **loc, hint='e.g. {"enable_thinking": false}')
    reserved = [k for k in _RESERVED_KWARGS if k in value]
    if reserved:
        raise DpocliError(f"sets '{reserved[0]}', which TRL passes itself (its call would fail)",
                          field=f"{field}.{reserved[0]}", **loc)
    return value


def refuse_images(names, loc: dict) -> None:
    """TRL routes rows with an image column to its vision collator; text-only scores would differ."""
    for name in IMAGE_COLUMNS:
        if name in names:
            raise DpocliError("is an image column: vision datasets are not supported yet (training on the "
                              "text alone would silently ignore the images)", field=name, **loc,
                              hint="drop the column for text-only training, or use a text-only dataset")


def type_name(value) -> str:
    names = {type(None): "null", bool: "bool", dict: "object", list: "list", str: "string"}
    return names.get(type(value), type(value).__name__)
