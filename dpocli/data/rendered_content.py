"""Did the chat template render what a completion's messages say? (the rule against silent loss)

A chat template renders only the message keys it knows. Gemma-2's writes role and content, so an
assistant turn that only calls a tool comes out as an empty turn (the scored completion is
`<end_of_turn>\\n`); DeepSeek-R1's keeps only what follows `</think>`, so a reply's reasoning is
gone. Both TRL and a naive port train on what is left. The rule here: the rendered completion must
contain, for each message of the completion,
- its content (for a content holding `<think>...</think>`, the reasoning and the answer apart, as
  Qwen3's template re-renders them with its own spacing),
- its reasoning (`reasoning_content`, `reasoning` or `thinking`),
- each tool call's function name, and every argument key and non-null scalar value (as written, or
  JSON-escaped, or in JSON / Python spelling for numbers, booleans).
Surrounding whitespace is ignored (templates trim). Null values are skipped: they may be keys that
another row added (`messages.unify_column`), not what this row gave.

Pure string work: no tokenizer, no torch.
"""

from __future__ import annotations

import json

from dpocli.data.chat import REASONING_KEYS

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def first_missing(messages: list[dict], rendered: str) -> tuple[int, str, str] | None:
    """The first thing a message of `messages` gave that `rendered` lacks, as (message index,
    key such as "content" or "tool_calls[0]", a short description), or None when all is there."""
    for i, message in enumerate(messages):
        for key, piece in _pieces(message):
            if not any(form in rendered for form in _spellings(piece)):
                text = piece.strip()
                shown = text if len(text) <= 40 else text[:37] + "..."
                return i, key, f"{shown!r}"
    return None


def _pieces(message: dict):
    """(key, text) for every bit of text the message gives that a rendering must show."""
    content = message.get("content")
    if isinstance(content, str):
        if _THINK_CLOSE in content:
            reasoning, answer = content.split(_THINK_CLOSE, 1)
            yield "content (its <think> reasoning)", reasoning.split(_THINK_OPEN)[-1]
            yield "content", answer
        else:
            yield "content", content
    for key in REASONING_KEYS:
        if isinstance(message.get(key), str):
            yield key, message[key]
    for j, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") if isinstance(call.get("function"), dict) else call
        if isinstance(function.get("name"), str):
            yield f"tool_calls[{j}] (its name)", function["name"]
        for piece in _argument_pieces(function.get("arguments")):
            yield f"tool_calls[{j}] (its arguments)", piece


def _argument_pieces(arguments):
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            yield arguments
            return
    yield from _leaves(arguments)


def _leaves(value):
    """Keys and scalar values of a JSON value, nulls (and their keys) left out."""
    if isinstance(value, dict):
        for key, item in value.items():
            if item is not None:
                yield str(key)
                yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    elif value is not None:
        yield value if isinstance(value, str) else json.dumps(value)


def _spellings(piece: str) -> list[str]:
    """The forms a template may write `piece` in; an empty piece is always there."""
    text = piece.strip()
    if not text:
        return [""]
    forms = [text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]]
    if text in ("true", "false"):
        forms.append(text.capitalize())  # a template that prints a Python dict
    return forms
