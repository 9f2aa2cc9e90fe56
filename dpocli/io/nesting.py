"""How deep a row's values may nest: a row nested deeper is bad input, refused before any
recursive code (the row checks, the chat-template renderer) could run out of stack on it.

Standard library only; used by data.py's readers for JSON Lines, Parquet and Arrow rows alike.
"""

from __future__ import annotations

from dpocli.errors import DpocliError

# Lists and objects within lists and objects: a chat row with tool schemas needs about 10. A row
# nested deeper is refused as bad input, before any recursive code (the checks here, the template
# renderer) could run out of stack on it.
MAX_DEPTH = 100


def too_deep(loc: dict, field: str | None = None) -> DpocliError:
    return DpocliError(f"nests lists and objects more than {MAX_DEPTH} levels deep; no chat message or "
                       "tool schema needs that", field=field, **loc)


def check_depth(record: dict, loc: dict) -> None:
    """Refuse a row with a list or object more than MAX_DEPTH levels down a field's value (the
    value itself is level 1), without recursing itself."""
    for field, value in record.items():
        stack = [(value, 1)] if isinstance(value, (dict, list)) else []
        while stack:
            item, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise too_deep(loc, field)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
