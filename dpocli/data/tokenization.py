"""Turn an `Example` into token ids exactly as TRL's DPOTrainer (v1.x) does.

All tokenization conventions live here, so stage 1 (precompute) is the only place text becomes
ids; stage 2 reads ids from the cache and cannot disagree. The conventions, matched to TRL 1.16:

* Standard rows: the tokenizer's own special tokens (a Llama tokenizer adds BOS, nothing else);
  the EOS *string* is appended to each completion unless it already ends with it; prompt and
  completion are joined as raw strings with no separator and tokenized together.
* Conversational rows: the chat template renders the prompt (with the generation prompt) and
  prompt + completion, given the row's `tools` and `chat_template_kwargs` and every message key,
  as TRL passes them; the rendered text is tokenized without extra special tokens (the template
  carries BOS and end-of-turn); no EOS is appended. An empty reply scores the end of turn alone.
* Rows that would give a number TRL's row does not mean are `Dropped` with a reason (precompute
  counts them, or with --strict reports the row's error): a message of a role the template leaves
  out (`role_not_rendered`), a completion under another role's header (`completion_not_assistant`),
  a completion whose content, reasoning or tool calls the template leaves out
  (`template_drops_content`, see rendered_content.py), a template error (`template_error`), and a
  completion with no tokens at all (`empty_completion`).
* `prompt_ids` is the longest common prefix of the tokenized prompt and both joint tokenizations;
  the completions are the rest. (If BPE merges across the boundary the prompt shrinks, as in TRL.)
* Truncation `keep_start`: prompt + completion is cut to `max_length` from the end, so a long
  completion loses its tail (EOS included). A prompt that alone fills `max_length` is dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import jinja2

from dpocli.data import rendered_content
from dpocli.data.examples import Example
from dpocli.errors import DpocliError, UnusableRow

DROP_PROMPT_TOO_LONG = "prompt_too_long"
DROP_ROLE_NOT_RENDERED = "role_not_rendered"
DROP_COMPLETION_NOT_ASSISTANT = "completion_not_assistant"
DROP_TEMPLATE_DROPS_CONTENT = "template_drops_content"
DROP_TEMPLATE_ERROR = "template_error"
DROP_EMPTY_COMPLETION = "empty_completion"


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair after truncation.

    `chosen_ids` / `rejected_ids` are the completion tokens only (what gets scored); the sequences
    fed to a model are `prompt_ids + chosen_ids` and `prompt_ids + rejected_ids`.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_shrunk: bool = False  # BPE merged across the prompt/completion boundary


@dataclass(frozen=True)
class Dropped:
    """A row left out, and why. `error` is the one-line error --strict reports (None for a prompt
    that fills --max-length: precompute words that one, it knows the flag)."""

    reason: str
    error: DpocliError | None = field(default=None, compare=False)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# Roles every tool-capable chat template handles. Any other role (and "developer" is one: Qwen's
# templates skip it) must be shown to be rendered by the template at hand (`_check_roles`).
STANDARD_ROLES = frozenset({"system", "user", "assistant", "tool"})


def _template_kwargs(example: Example) -> dict:
    # TRL 1.16's tokenize step: {"tools": tools, **chat_template_kwargs}, so a "tools" key in the
    # row's kwargs wins over the column.
    return {"tools": example.tools, **(example.chat_template_kwargs or {})}


def _apply(tokenizer, messages, kwargs: dict, example: Example, field: str, **flags) -> str:
    if not tokenizer.chat_template:
        # The model's, not the row's: every conversational row would fail, so it is an error.
        raise DpocliError("is a message list, but the model's tokenizer has no chat template to render "
                          "it", file=example.file, row=example.row, field=field,
                          hint="use a model whose tokenizer has a chat template, or standard rows")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **flags, **kwargs)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UnusableRow(DROP_TEMPLATE_ERROR,
                          f"the model's chat template cannot render it ({type(e).__name__}: {detail})",
                          file=example.file, row=example.row, field=field) from None


def _render_conversation(tokenizer, example: Example, completion, side: str) -> tuple[str, str]:
    # TRL 1.16 (`DPOTrainer._prepare_dataset`) renders every conversational prompt with
    # add_generation_prompt=True, whatever its last role. (Older TRL continued a final assistant
    # turn instead; doing that here put the template's end-of-turn and assistant header into the
    # completion ids. tests/fixtures/trl_ids.json, group "conversational_assistant_last", checks it.)
    kwargs = _template_kwargs(example)
    prompt_text = _apply(tokenizer, example.prompt, kwargs, example, "prompt", add_generation_prompt=True)
    full_text = _apply(tokenizer, example.prompt + completion, kwargs, example, side)
    return prompt_text, full_text


def _check_roles(tokenizer, example: Example, completion, side: str, prompt_text: str, full_text: str):
    """Refuse a message the template would silently leave out, or a completion scored with the wrong
    header. Render once more, with each non-standard role's content replaced by a marker, and check
    every marker comes out (whatever the role list of the template). A completion that does not open
    with an assistant turn must continue the generation prompt's text, else the tokens of its own
    role header would be scored as if the model had generated them."""
    messages = example.prompt + completion
    odd = [i for i, m in enumerate(messages) if m["role"] not in STANDARD_ROLES]
    if odd:
        probe = [dict(m, content=f"dpocli-role-probe-{i}-") if i in odd else m
                 for i, m in enumerate(messages)]
        text = _apply(tokenizer, probe, _template_kwargs(example), example, side)
        for i in odd:
            if f"dpocli-role-probe-{i}-" not in text:
                where = f"prompt[{i}]" if i < len(example.prompt) else f"{side}[{i - len(example.prompt)}]"
                raise UnusableRow(DROP_ROLE_NOT_RENDERED,
                                  f"is {messages[i]['role']!r}, a role the model's chat template does not "
                                  "render (the message would be silently left out)", file=example.file,
                                  row=example.row, field=f"{where}.role",
                                  hint="use system, user, assistant or tool")
    first = completion[0]["role"]
    if first != "assistant" and not full_text.startswith(prompt_text):
        raise UnusableRow(DROP_COMPLETION_NOT_ASSISTANT,
                          f"is {first!r}, but the generation prompt opens an assistant turn: the {first!r} "
                          "header would be scored as generated text", file=example.file, row=example.row,
                          field=f"{side}[0].role", hint="a completion starts with the assistant's reply")


def _check_rendered(example: Example, completion, side: str, prompt_text: str, full_text: str) -> None:
    """Refuse a completion whose content, reasoning or tool calls the template left out of the
    scored text (rendered_content.py): training on what is left would be silent loss."""
    n = 0
    while n < min(len(prompt_text), len(full_text)) and prompt_text[n] == full_text[n]:
        n += 1
    missing = rendered_content.first_missing(completion, full_text[n:])
    if missing is not None:
        index, key, shown = missing
        raise UnusableRow(DROP_TEMPLATE_DROPS_CONTENT,
                          f"gives {shown}, which the model's chat template leaves out of the rendered "
                          "completion (training on the rest would silently lose it)", file=example.file,
                          row=example.row, field=f"{side}[{index}].{key}",
                          hint="use a chat template that renders it, or leave it out of the row")


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def text_bytes(value) -> int:
    """UTF-8 bytes of the text in a field: a string, or every string inside a message list."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, dict):
        return sum(text_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_bytes(v) for v in value)
    return 0


def check_field_sizes(example: Example, limit: int, columns: dict[str, str]) -> None:
    """Refuse a field larger than `limit` bytes before the tokenizer sees it: the tokenizer's
    memory grows with the text (measured: about 150 bytes per byte, 2.1 GB for a 15 MB field), and
    under a memory limit it aborts the process natively instead of raising. `columns` names the
    fields for the message."""
    for name, column in columns.items():
        size = text_bytes(getattr(example, name))
        if size > limit:
            raise DpocliError(f"is {size} bytes of text, more than --max-field-bytes {limit}",
                              file=example.file, row=example.row, field=column,
                              hint="shorten or drop that row, or raise --max-field-bytes (memory grows "
                                   "with it: about 150 bytes per byte of text in the tokenizer)")


def tokenize_pair(example: Example, tokenizer, max_length: int) -> TokenizedPair | Dropped:
    """Token ids of `example` under TRL's conventions (see module docstring), or why it was dropped."""
    try:
        return _tokenize_pair(example, tokenizer, max_length)
    except UnusableRow as e:
        return Dropped(e.reason, e)


def _tokenize_pair(example: Example, tokenizer, max_length: int) -> TokenizedPair | Dropped:
    if example.conversational:
        prompt_text, chosen_text = _render_conversation(tokenizer, example, example.chosen, "chosen")
        _, rejected_text = _render_conversation(tokenizer, example, example.rejected, "rejected")
        for side, completion, text in (("chosen", example.chosen, chosen_text),
                                       ("rejected", example.rejected, rejected_text)):
            _check_roles(tokenizer, example, completion, side, prompt_text, text)
            _check_rendered(example, completion, side, prompt_text, text)
        special = False  # the template already carries BOS
    else:
        eos = tokenizer.eos_token or ""
        chosen, rejected = example.chosen, example.rejected
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_text = example.prompt
        chosen_text, rejected_text = prompt_text + chosen, prompt_text + rejected
        special = True  # whatever the tokenizer adds by default, as TRL does

    prompt_ids = _encode(tokenizer, prompt_text, special)
    chosen_full = _encode(tokenizer, chosen_text, special)
    rejected_full = _encode(tokenizer, rejected_text, special)
    n_prompt = min(_common_prefix_len(prompt_ids, chosen_full),
                   _common_prefix_len(prompt_ids, rejected_full))
    shrunk = n_prompt < len(prompt_ids)
    prompt_ids = prompt_ids[:n_prompt]
    for side, full in (("chosen", chosen_full), ("rejected", rejected_full)):
        if len(full) == n_prompt:  # only a template that renders nothing for the reply gets here
            raise UnusableRow(DROP_EMPTY_COMPLETION, "renders to no tokens after the prompt (nothing "
                              "would be scored)", file=example.file, row=example.row, field=side)
    if n_prompt >= max_length:
        return Dropped(DROP_PROMPT_TOO_LONG)
    room = max_length - n_prompt
    return TokenizedPair(prompt_ids, chosen_full[n_prompt:][:room], rejected_full[n_prompt:][:room],
                         prompt_shrunk=shrunk)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in a tokenizer that can change ids: vocabulary, merges, normaliser,
    pre-/post-processors, special tokens and chat template, plus a probe encoding.

    transformers 5 can drop flags such as `add_bos_token` on save while still adding BOS, so the
    probe's actual ids are hashed too, not only the configuration.
    """
    parts = {"class": type(tokenizer).__name__}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts["backend"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        parts["vocab"] = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
    parts["chat_template"] = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else (
        json.dumps(tokenizer.chat_template, sort_keys=True) if tokenizer.chat_template else None)
    parts["special"] = {name: [getattr(tokenizer, name, None), getattr(tokenizer, f"{name}_id", None)]
                        for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    parts["probe"] = _encode(tokenizer, "Hello world, 123!", True)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def pad_token_id(tokenizer) -> int:
    """Id used for padding: the pad token, else EOS (padding is masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0
