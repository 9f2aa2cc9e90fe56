"""Chat rows beyond role/content: tools, tool calls, tool turns, chat_template_kwargs, unknown roles,
and image rows, from reading (dpocli.data.examples / dpocli.data.chat) to token ids (dpocli.data.tokenization).

Expected ids come from tests/fixtures/trl_chat_ids.json: what TRL 1.16's DPOTrainer produced for the
same rows with the same tokenizer (sample_data/tiny-llama with tests/fixtures/tool_chat_template.jinja),
written by tests/fixtures/make_trl_chat_ids.py. Refusals are checked by their one-line message.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import MODEL, invoke, write_jsonl
from dpocli.data.chat import unify_column
from dpocli.data.examples import Example, read_examples
from dpocli.data.tokenization import Dropped, TokenizedPair, tokenize_pair, tokenizer_fingerprint
from dpocli.errors import DpocliError

FIXTURES = Path(__file__).parent / "fixtures"
BIG = 10**6
GROUPS = ["tools_list", "tools_json", "tool_calls_in_prompt", "tool_turns_in_completion", "template_kwargs",
          "extra_message_keys", "implicit_with_tools", "rendered_unknown_role"]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    """The bundled tokenizer with a Qwen-style template that renders tools and enable_thinking."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (FIXTURES / "tool_chat_template.jinja").read_text()
    return tok


@pytest.fixture(scope="module")
def tokenizers(tokenizer, chat_tokenizer):
    return {"tool": chat_tokenizer, "bundled": tokenizer}


@pytest.fixture(scope="module")
def trl_chat(tokenizers):
    fixture = json.loads((FIXTURES / "trl_chat_ids.json").read_text())
    assert fixture["trl_version"] == "1.16.0"
    fingerprints = {k: tokenizer_fingerprint(t) for k, t in tokenizers.items()}
    assert fixture["tokenizer_fingerprints"] == fingerprints, (
        "fixture is stale: rerun tests/fixtures/make_trl_chat_ids.py")
    assert list(fixture["groups"]) == GROUPS
    return {name: group["rows"] for name, group in fixture["groups"].items()}, \
        {name: group["template"] for name, group in fixture["groups"].items()}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def read_rows(tmp_path, rows, fmt="jsonl"):
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return read_examples(path).examples


def one(tmp_path, row, tokenizer):
    (example,) = read_rows(tmp_path, [row])
    return tokenize_pair(example, tokenizer, BIG)


# --- token ids equal TRL's ---

@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("group", GROUPS)
def test_ids_equal_trl(tmp_path, trl_chat, tokenizers, group, fmt):
    groups, templates = trl_chat
    entries = groups[group]
    examples = read_rows(tmp_path, [e["row"] for e in entries], fmt)
    assert [e.id for e in examples] == [e["row"]["id"] for e in entries]
    for example, entry in zip(examples, entries, strict=True):
        pair = tokenize_pair(example, tokenizers[templates[group]], BIG)
        assert isinstance(pair, TokenizedPair)
        assert pair.prompt_ids == entry["prompt_ids"], example.id
        assert pair.chosen_ids == entry["chosen_ids"], example.id
        assert pair.rejected_ids == entry["rejected_ids"], example.id


def test_trl_fixture_exercises_what_it_claims(trl_chat, chat_tokenizer):
    groups, templates = trl_chat
    assert {g for g, t in templates.items() if t == "bundled"} == {"rendered_unknown_role"}
    decode = chat_tokenizer.decode
    text = {g: [decode(e["prompt_ids"] + e["chosen_ids"]) + decode(e["rejected_ids"])
                for e in groups[g]] for g in GROUPS}
    assert all("<tools>" in t for t in text["tools_list"] + text["tools_json"])
    assert any('"unit": null' in t for t in text["tools_list"])  # Arrow's union, rendered by TRL
    # A completion that is only a tool call, and tool turns inside prompts and completions.
    assert decode(groups["tools_list"][0]["chosen_ids"]).startswith("\n<tool_call>")
    assert "<tool_response>" in decode(groups["tool_calls_in_prompt"][0]["prompt_ids"])
    assert "<tool_response>" in decode(groups["tool_turns_in_completion"][0]["chosen_ids"])
    thinking = ["<think>" in decode(e["prompt_ids"]) for e in groups["template_kwargs"]]
    assert thinking == [True, False, False]  # off, on, and null (the missing key) is not `false`
    reasoning = groups["extra_message_keys"]
    assert decode(reasoning[0]["chosen_ids"]).startswith("<think>\n7 has no divisors.\n</think>")


def test_arrow_union_is_what_makes_the_ids_equal(trl_chat, chat_tokenizer):
    groups, _ = trl_chat
    # The rows as written (no null-filled keys) give other ids than TRL's: the union matters.
    entry = groups["tools_list"][0]
    row = entry["row"]
    raw = Example("x", 0, row["prompt"], row["chosen"], row["rejected"], True, "t.jsonl", 1,
                  tools=row["tools"])
    assert tokenize_pair(raw, chat_tokenizer, BIG).prompt_ids != entry["prompt_ids"]


def test_unify_column_follows_arrow(tmp_path):
    def calls(arguments):
        return [{"role": "assistant", "tool_calls": [{"function": {"arguments": arguments}}]}]
    values = [[{"role": "user", "content": "a"}], calls({"unit": "C", "city": "X"}), calls({"city": "Y"})]
    expected = pa.Table.from_pylist([{"m": v} for v in values]).column("m").to_pylist()
    assert unify_column(values) == expected
    assert list(unify_column(values)[2][0]["tool_calls"][0]["function"]["arguments"]) == ["unit", "city"]


def test_tools_and_kwargs_are_rendered_not_ignored(tmp_path, chat_tokenizer):
    row = {"prompt": [user("Weather?")], "chosen": [assistant("Sunny.")], "rejected": [assistant("Rain.")]}
    plain = one(tmp_path, row, chat_tokenizer)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    with_tools = one(tmp_path, {**row, "tools": tools}, chat_tokenizer)
    as_json = one(tmp_path, {**row, "tools": json.dumps(tools)}, chat_tokenizer)
    no_think = one(tmp_path, {**row, "chat_template_kwargs": {"enable_thinking": False}}, chat_tokenizer)
    assert with_tools == as_json != plain
    assert "get_weather" in chat_tokenizer.decode(with_tools.prompt_ids)
    assert no_think.prompt_ids[:len(plain.prompt_ids)] == plain.prompt_ids
    assert chat_tokenizer.decode(no_think.prompt_ids).endswith("<think>\n\n</think>\n\n")


def test_tool_call_only_completion_is_accepted(tmp_path, chat_tokenizer):
    call = {"role": "assistant", "tool_calls": [{"type": "function",
                                                 "function": {"name": "f", "arguments": {"x": 1}}}]}
    pair = one(tmp_path, {"prompt": [user("Call f.")], "chosen": [call], "rejected": [assistant("No.")]},
               chat_tokenizer)
    assert chat_tokenizer.decode(pair.chosen_ids) == \
        '\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n'


# --- roles ---

def dropped(tmp_path, row, tokenizer, reason: str) -> str:
    """The one-line error of a row tokenization drops for `reason` (what --strict reports)."""
    got = one(tmp_path, row, tokenizer)
    assert isinstance(got, Dropped) and got.reason == reason, got
    assert isinstance(got.error, DpocliError) and "\n" not in str(got.error)
    return str(got.error)


def test_unknown_role_the_template_drops_is_refused(tmp_path, chat_tokenizer):
    row = {"prompt": [user("Hi"), {"role": "robot", "content": "beep"}, user("Go on")],
           "chosen": [assistant("Yes.")], "rejected": [assistant("No.")]}
    assert ("rows.jsonl:1: field 'prompt[1].role' is 'robot', a role the model's chat template does "
            "not render") in dropped(tmp_path, row, chat_tokenizer, "role_not_rendered")
    # "developer" is not assumed to render either: this (Qwen-style) template skips it.
    row["prompt"][1]["role"] = "developer"
    assert "prompt[1].role' is 'developer'" in dropped(tmp_path, row, chat_tokenizer, "role_not_rendered")


def test_unknown_role_the_template_renders_is_accepted(tmp_path, tokenizer):
    # The bundled template writes any role as <|role|>: the message is rendered, so it is kept.
    row = {"prompt": [user("Hi"), {"role": "wizard", "content": "Abracadabra."}],
           "chosen": [assistant("Yes.")], "rejected": [assistant("No.")]}
    pair = one(tmp_path, row, tokenizer)
    assert tokenizer.decode(pair.prompt_ids).endswith("<|wizard|>\nAbracadabra.<|end|>\n<|assistant|>\n")


@pytest.mark.parametrize("role", ["robot", "user"])
def test_completion_under_another_header_is_refused(tmp_path, tokenizer, role):
    row = {"prompt": [user("Hi")], "chosen": [{"role": role, "content": "beep"}],
           "rejected": [assistant("No.")]}
    assert f"field 'chosen[0].role' is '{role}', but the generation prompt opens an assistant turn" \
        in dropped(tmp_path, row, tokenizer, "completion_not_assistant")


def test_template_error_names_the_row(tmp_path, chat_tokenizer):
    row = {"prompt": [user("Hi")], "chosen": [assistant("Yes.")], "rejected": [assistant("No.")],
           "chat_template_kwargs": {"continue_final_message": True}}
    assert "rows.jsonl:1: field 'prompt' the model's chat template cannot render" \
        in dropped(tmp_path, row, chat_tokenizer, "template_error")


# --- refused on reading ---

OK = {"prompt": [user("Hi")], "chosen": [assistant("Yes.")], "rejected": [assistant("No.")]}

BAD_ROWS = [
    ("images", {**OK, "images": ["a.png"]}, "images", "vision datasets are not supported"),
    ("image_null", {**OK, "image": None}, "image", "is an image column"),
    ("content_parts", {**OK, "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                         "text": "What?"}]}]},
     "prompt[0].content", "content parts (image, text); multimodal messages are not supported"),
    ("tool_calls_not_list", {**OK, "chosen": [{"role": "assistant", "tool_calls": "f()"}]},
     "chosen[0].tool_calls", "must be a list of tool-call objects"),
    ("tools_bad_json", {**OK, "tools": "[{"}, "tools", "not valid JSON"),
    ("tools_not_list", {**OK, "tools": {"name": "f"}}, "tools", "must be a list of tool objects"),
    ("kwargs_not_object", {**OK, "chat_template_kwargs": "enable_thinking=False"}, "chat_template_kwargs",
     "must be an object"),
    ("kwargs_reserved", {**OK, "chat_template_kwargs": {"add_generation_prompt": False}},
     "chat_template_kwargs.add_generation_prompt", "TRL passes itself"),
]


@pytest.mark.parametrize("row, field, fragment", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_chat_rows_are_refused(tmp_path, row, field, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [OK, row])
    with pytest.raises(DpocliError) as err:
        read_examples(path)
    text = str(err.value)
    assert text.startswith(f"{path}:2: field '{field}' ") and fragment in text and "\n" not in text, text


def test_content_key_missing_from_the_whole_column_is_refused(tmp_path):
    # Null content is the template's business (Arrow gives null where one row lacks the key), but a
    # column where no message has 'content' holds its text under another name: every turn would
    # render empty.
    rows = [{"prompt": [{"role": "user", "text": "Hi"}], "chosen": [assistant("Yes.")],
             "rejected": [assistant("No.")]}]
    with pytest.raises(DpocliError) as err:
        read_examples(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert "bad.jsonl:1: field 'prompt[0].content' is missing" in str(err.value)


def test_parquet_image_column_is_refused_before_any_row(tmp_path):
    pq.write_table(pa.Table.from_pylist([{**OK, "images": [b"\x89PNG"]}]), tmp_path / "v.parquet")
    with pytest.raises(DpocliError, match=r"v.parquet: field 'images' is an image column"):
        read_examples(tmp_path / "v.parquet")


def test_plain_text_rows_with_tools_warn(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "tools": "[]",
                                               "score": 1}])
    result = read_examples(path)
    assert result.examples[0].tools is None
    assert any("1 plain-text row(s) have 'tools'" in w for w in result.warnings)
    assert any(w.endswith("TRL's DPOTrainer either: score") for w in result.warnings)


def test_precompute_renders_tools_end_to_end(tmp_path, trl_chat, chat_tokenizer):
    """The CLI path: a model folder whose tokenizer carries the tool template, rows from the fixture."""
    groups, _ = trl_chat
    model = tmp_path / "model"
    model.mkdir()
    for f in MODEL.iterdir():
        if f.is_file():
            (model / f.name).symlink_to(f)
    for f in ("tokenizer_config.json", "chat_template.jinja", "tokenizer.json", "special_tokens_map.json"):
        if (model / f).exists():
            (model / f).unlink()
    chat_tokenizer.save_pretrained(model)
    rows = [e["row"] for e in groups["tool_turns_in_completion"]]
    out = tmp_path / "cache"
    result = invoke(["precompute-ref", write_jsonl(tmp_path / "tools.jsonl", rows), "--model", model,
                     "--out", out, "--quiet", "--json", "--token-logps"])
    assert result.exit_code == 0, result.stderr
    shard = pq.read_table(next(out.glob("part-*.parquet"))).to_pylist()
    expected = {e["row"]["id"]: e for e in groups["tool_turns_in_completion"]}
    for r in shard:
        assert r["prompt_ids"] == expected[r["id"]]["prompt_ids"]
        assert r["chosen_ids"] == expected[r["id"]]["chosen_ids"]
