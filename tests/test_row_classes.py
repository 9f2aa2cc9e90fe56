"""Row classes of issue 23: rows TRL 1.16 trains on that dpocli used to refuse (their ids must be
TRL's), and rows whose content the chat template silently leaves out (skipped and counted, or an
error with --strict).

Expected ids come from tests/fixtures/trl_row_classes.json, recorded from TRL 1.16's DPOTrainer by
tests/fixtures/make_trl_row_classes.py. The templates that lose content are small jinja files under
tests/fixtures/ reproducing Gemma-2's (drops assistant tool_calls) and DeepSeek-R1's (drops the
reasoning of a reply); the Llama-3-like one renders null content as its real template does.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from conftest import MODEL, invoke, write_jsonl
from dpocli.cache.store import load_cache
from dpocli.data.examples import read_examples
from dpocli.data.tokenization import Dropped, TokenizedPair, tokenize_pair, tokenizer_fingerprint

FIXTURES = Path(__file__).parent / "fixtures"
BIG = 10**6
TEMPLATES = {"tool": "tool_chat_template.jinja", "llama3_like": "llama3_like_template.jinja",
             "gemma2_like": "gemma2_like_template.jinja", "r1_like": "r1_like_template.jinja"}
LEGITIMATE = ["reasoning_only", "empty_completion_standard", "empty_completion_implicit",
              "empty_completion_chat", "null_content"]


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    out = {"bundled": tokenizer}
    for name, file in TEMPLATES.items():
        out[name] = copy.deepcopy(tokenizer)
        out[name].chat_template = (FIXTURES / file).read_text()
    return out


@pytest.fixture(scope="module")
def trl_groups(tokenizers):
    fixture = json.loads((FIXTURES / "trl_row_classes.json").read_text())
    assert fixture["trl_version"] == "1.16.0"
    for name, fingerprint in fixture["tokenizer_fingerprints"].items():
        assert tokenizer_fingerprint(tokenizers[name]) == fingerprint, (
            "fixture is stale: rerun tests/fixtures/make_trl_row_classes.py")
    return fixture["groups"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def call(name, arguments):
    return {"role": "assistant", "tool_calls": [{"type": "function",
                                                 "function": {"name": name, "arguments": arguments}}]}


def tokenize_rows(tmp_path, rows, tokenizer):
    """dpocli's ids for `rows` read as one JSON Lines file (one dataset, as TRL's group)."""
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    return {ex.id: tokenize_pair(ex, tokenizer, BIG) for ex in read_examples(path).examples}


# --- §2: rows TRL trains on are kept, with TRL's ids ---

@pytest.mark.parametrize("group", LEGITIMATE)
def test_ids_equal_trl(tmp_path, tokenizers, trl_groups, group):
    entry = trl_groups[group]
    got = tokenize_rows(tmp_path, [r["row"] for r in entry["rows"]], tokenizers[entry["template"]])
    for expected in entry["rows"]:
        pair = got[expected["row"]["id"]]
        assert isinstance(pair, TokenizedPair), (expected["row"]["id"], pair)
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (
            expected["prompt_ids"], expected["chosen_ids"], expected["rejected_ids"]), expected["row"]["id"]


def test_empty_reply_scores_the_end_of_turn_alone(tmp_path, tokenizers, trl_groups):
    # Independent of the fixture: what TRL's rule means for the bundled tokenizer.
    tok = tokenizers["bundled"]
    got = tokenize_rows(tmp_path, [r["row"] for r in trl_groups["empty_completion_standard"]["rows"]], tok)
    assert got["es-1"].chosen_ids == [tok.eos_token_id]


def test_null_content_a_template_cannot_print_is_a_template_error(tmp_path, tokenizers):
    # The Qwen-style template concatenates the system content: null fails there (TRL stops the
    # whole dataset); dpocli skips the row by reason, the Llama-3-like template renders it.
    row = {"prompt": [{"role": "system", "content": None}, user("Hi")], "chosen": [assistant("Hello.")],
           "rejected": [assistant("Go.")]}
    (got,) = tokenize_rows(tmp_path, [row], tokenizers["tool"]).values()
    assert isinstance(got, Dropped) and got.reason == "template_error", got
    assert "field 'prompt' the model's chat template cannot render it" in str(got.error)
    (kept,) = tokenize_rows(tmp_path, [row], tokenizers["llama3_like"]).values()
    assert isinstance(kept, TokenizedPair)


def test_arrow_float_coercion_is_a_deliberate_difference(tmp_path, tokenizers, trl_groups):
    """TRL's Arrow table makes the 5 of one row 5.0, because another row has 2.5 under the key;
    dpocli renders what the row says (README, TRL parity)."""
    entry = trl_groups["arrow_float_coercion"]
    tok = tokenizers[entry["template"]]
    got = tokenize_rows(tmp_path, [r["row"] for r in entry["rows"]], tok)
    trl_5, trl_25 = entry["rows"]
    assert '"arguments": {"n": 5.0}' in tok.decode(trl_5["chosen_ids"])
    assert '"arguments": {"n": 5}' in tok.decode(got["af-1"].chosen_ids)
    assert got["af-2"].chosen_ids == trl_25["chosen_ids"]


# --- §3: content the template leaves out is caught ---

TOOL_CALL_ROW = {"prompt": [user("Weather in Paris?")], "chosen": [call("get_weather", {"city": "Paris"})],
                 "rejected": [assistant("It is sunny.")]}
INLINE_THINK_ROW = {"prompt": [user("2 + 2?")], "chosen": [assistant("<think>\nAdd two and two.\n</think>\n\n4")],
                    "rejected": [assistant("5")]}
REASONING_KEY_ROW = {"prompt": [user("2 + 2?")], "chosen": [assistant("4", reasoning_content="Add them.")],
                     "rejected": [assistant("5")]}


@pytest.mark.parametrize("template, row, field, shown", [
    ("gemma2_like", TOOL_CALL_ROW, "chosen[0].tool_calls[0] (its name)", "'get_weather'"),
    ("r1_like", INLINE_THINK_ROW, "chosen[0].content (its <think> reasoning)", "'Add two and two.'"),
    ("r1_like", REASONING_KEY_ROW, "chosen[0].reasoning_content", "'Add them.'"),
])
def test_content_the_template_leaves_out_is_dropped(tmp_path, tokenizers, template, row, field, shown):
    (got,) = tokenize_rows(tmp_path, [row], tokenizers[template]).values()
    assert isinstance(got, Dropped) and got.reason == "template_drops_content", got
    assert str(got.error).startswith(f"{tmp_path / 'rows.jsonl'}:1: field '{field}' gives {shown}, which "
                                     "the model's chat template leaves out"), str(got.error)


@pytest.mark.parametrize("template, row", [
    ("tool", TOOL_CALL_ROW), ("tool", REASONING_KEY_ROW), ("bundled", INLINE_THINK_ROW),
    ("gemma2_like", {**TOOL_CALL_ROW, "chosen": [assistant("  Sunny, 20 C.  ")]}),
    ("r1_like", {**INLINE_THINK_ROW, "chosen": [assistant("4")]}),
])
def test_templates_that_render_everything_keep_the_row(tmp_path, tokenizers, template, row):
    (got,) = tokenize_rows(tmp_path, [row], tokenizers[template]).values()
    assert isinstance(got, TokenizedPair), got


def test_arguments_and_tool_turns_are_checked_too(tmp_path, tokenizers):
    # A template that writes the function name but drops the arguments loses the call's meaning.
    tok = copy.deepcopy(tokenizers["bundled"])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
                         "{% if m['tool_calls'] %}{{ m['tool_calls'][0]['function']['name'] }}"
                         "{% elif m['role'] != 'tool' %}{{ m['content'] }}{% endif %}{{ '<|end|>\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    (got,) = tokenize_rows(tmp_path, [TOOL_CALL_ROW], tok).values()
    assert got.reason == "template_drops_content" and "(its arguments)' gives 'city'" in str(got.error)
    row = {**TOOL_CALL_ROW, "chosen": [assistant("Let me look."), {"role": "tool", "content": "rain at noon"},
                                       assistant("It will rain.")]}
    (got,) = tokenize_rows(tmp_path, [row], tok).values()
    assert got.reason == "template_drops_content"
    assert "field 'chosen[1].content' gives 'rain at noon'" in str(got.error)


def test_reply_that_renders_to_nothing_is_dropped(tmp_path, tokenizers):
    tok = copy.deepcopy(tokenizers["bundled"])
    tok.chat_template = ("{% for m in messages %}{% if m['content'] %}{{ '<|' + m['role'] + '|>\n' + "
                         "m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}")
    row = {"prompt": [user("Hi")], "chosen": [assistant("")], "rejected": [assistant("Hello.")]}
    (got,) = tokenize_rows(tmp_path, [row], tok).values()
    assert got.reason == "empty_completion" and "field 'chosen' renders to no tokens" in str(got.error)


# --- precompute: such rows are skipped and counted, or errors with --strict ---

@pytest.fixture
def gemma_like_model(tmp_path):
    """The bundled model with the Gemma-2-like template (weights linked, not copied)."""
    folder = tmp_path / "gemma-like"
    folder.mkdir()
    for item in MODEL.iterdir():
        if item.name == "model.safetensors":
            (folder / item.name).symlink_to(item)
        else:
            shutil.copy(item, folder / item.name)
    (folder / "chat_template.jinja").write_text((FIXTURES / "gemma2_like_template.jinja").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_precompute_skips_and_counts_unusable_rows(tmp_path, gemma_like_model):
    rows = [{"id": "ok-1", "prompt": [user("Hi")], "chosen": [assistant("Hello.")], "rejected": [assistant("Go.")]},
            {"id": "tool", **TOOL_CALL_ROW},
            {"id": "ok-2", "prompt": [user("Bye")], "chosen": [assistant("")], "rejected": [assistant("Stay.")]},
            {"id": "user-reply", "prompt": [user("Hi")], "chosen": [user("Hi again.")],
             "rejected": [assistant("Hello.")]}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "cache"
    result = invoke(["precompute-ref", path, "--model", gemma_like_model, "--out", out, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    expected = {"template_drops_content": 1, "completion_not_assistant": 1}
    assert (summary["rows_read"], summary["rows_written"], summary["rows_dropped"]) == (4, 2, expected)
    manifest, data = load_cache(out)
    assert manifest.dropped == expected and list(data.ids) == ["ok-1", "ok-2"]
    logs = " ".join(result.stderr.split())  # the console wraps long warnings
    assert f"skipped 1 row(s), template_drops_content (first: {path}:2: field 'chosen[0].tool_calls[0] " \
        "(its name)' gives 'get_weather'" in logs
    assert f"skipped 1 row(s), completion_not_assistant (first: {path}:4: field 'chosen[0].role'" in logs
    assert "Traceback" not in result.stderr

    strict = invoke(["precompute-ref", path, "--model", gemma_like_model, "--out", tmp_path / "strict",
                     "--strict"])
    assert strict.exit_code == 2 and not (tmp_path / "strict").exists()
    errors = [line for line in strict.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}:2: field 'chosen[0].tool_calls[0] (its name)' gives 'get_weather', which "
                      "the model's chat template leaves out of the rendered completion (training on the rest "
                      "would silently lose it)"], strict.stderr


def test_rows_unusable_on_reading_are_skipped_and_counted(tmp_path):
    good = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}
    rows = [good, {**good, "prompt": "  "}, {"chosen": "yes", "rejected": "no"}, good,
            {"prompt": [user("Hi")], "chosen": [assistant("Yes.")], "rejected": []}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "cache"
    result = invoke(["precompute-ref", path, "--model", MODEL, "--out", out, "--json"])
    assert result.exit_code == 0, result.stderr
    expected = {"empty_prompt": 1, "no_common_prefix": 1, "empty_message_list": 1}
    summary = json.loads(result.stdout)
    assert (summary["rows_read"], summary["rows_written"], summary["rows_dropped"]) == (5, 2, expected)
    manifest, data = load_cache(out)
    assert manifest.dropped == expected and data.source_row.tolist() == [0, 3]
    logs = " ".join(result.stderr.split())
    assert f"skipped 1 row(s), empty_prompt (first: {path}:2: field 'prompt' is whitespace-only" in logs
    strict = invoke(["precompute-ref", path, "--model", MODEL, "--out", tmp_path / "strict", "--strict"])
    assert strict.exit_code == 2 and not (tmp_path / "strict").exists()
    assert f"error: {path}:2: field 'prompt' is whitespace-only" in strict.stderr


def test_hh_rlhf_empty_reply_does_not_stop_the_run(tmp_path, tokenizer):
    """HH-RLHF harmless-base test stopped at row 87 (a reply that is empty after 'Assistant:')."""
    rows = [{"chosen": f"\n\nHuman: Question {i}?\n\nAssistant: Answer {i}.",
             "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: No."} for i in range(3)]
    rows.insert(1, {"chosen": "\n\nHuman: Say nothing.\n\nAssistant: ",
                    "rejected": "\n\nHuman: Say nothing.\n\nAssistant: Okay."})
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    out = tmp_path / "cache"
    result = invoke(["precompute-ref", path, "--model", MODEL, "--out", out, "--json", "--strict"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["rows_written"], summary["rows_dropped"]) == (4, {})
    _, data = load_cache(out)
    i = list(data.source_row).index(1)
    assert data.row_list("chosen_ids", i).tolist() == tokenizer(" </s>", add_special_tokens=False)["input_ids"]


# --- accepted where TRL refuses (README, TRL parity): each row gets the ids it has on its own ---

@pytest.mark.parametrize("rows", [
    [{"id": "s", "prompt": "Q: hi\nA:", "chosen": " yes", "rejected": " no"},
     {"id": "c", "prompt": [user("Hi")], "chosen": [assistant("Yes.")], "rejected": [assistant("No.")]}],
    [{"id": "k", "prompt": [user("2 + 2?")], "chosen": [assistant("4")], "rejected": [assistant("5")],
      "chat_template_kwargs": {"enable_thinking": False}},
     {"id": "n", "prompt": [user("3 + 3?")], "chosen": [assistant("6")], "rejected": [assistant("9")]}],
], ids=["mixed_kinds", "kwargs_on_some_rows"])
def test_rows_trl_cannot_mix_get_their_own_ids(tmp_path, tokenizers, rows):
    tok = tokenizers["tool"]
    together = tokenize_rows(tmp_path, rows, tok)
    for row in rows:
        (alone,) = tokenize_rows(tmp_path, [row], tok).values()
        assert isinstance(alone, TokenizedPair) and together[row["id"]] == alone, row["id"]
    if "k" in together:
        assert tok.decode(together["k"].prompt_ids).endswith("<think>\n\n</think>\n\n")
        assert "<think>" not in tok.decode(together["n"].prompt_ids)
