"""Tests for dpocli.data.tokenization: ids under TRL 1.16's conventions.

Expected ids come from outside the code under test:
* by hand from the tokenizer: standard rows are `tokenizer(prompt)` (BOS added by the tokenizer)
  followed by `tokenizer(completion, add_special_tokens=False) + [eos_id]`; conversational rows are
  the chat template rendered by hand (the format make_sample.py documents:
  `<s><|role|>\\ncontent<|end|>\\n...<|assistant|>\\n`) and tokenized without special tokens;
* tests/fixtures/trl_ids.json: the ids TRL 1.16's DPOTrainer produced for sample rows (and rows
  derived from them), written by tests/fixtures/make_trl_ids.py, plus TRL's collator output for
  two short max_lengths (keep_start truncation and the prompt-length drop).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from dpocli.data.examples import Example, extract_prompt, read_examples
from dpocli.data.tokenization import (
    DROP_PROMPT_TOO_LONG,
    Dropped,
    TokenizedPair,
    pad_token_id,
    tokenize_pair,
    tokenizer_fingerprint,
)

FIXTURE = Path(__file__).parent / "fixtures" / "trl_ids.json"
BIG = 10**6  # a max_length nothing reaches


def example(prompt, chosen, rejected, id="x") -> Example:
    return Example(id=id, source_row=0, prompt=prompt, chosen=chosen, rejected=rejected,
                   conversational=isinstance(chosen, list), file="test.jsonl", row=1)


def row_example(row: dict) -> Example:
    return example(row["prompt"], row["chosen"], row["rejected"], id=row.get("id", "x"))


def hand_render(messages: list[dict], generation_prompt: bool) -> str:
    """The bundled chat template, written out by hand."""
    text = "<s>" + "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return text + ("<|assistant|>\n" if generation_prompt else "")


def ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@pytest.fixture(scope="module")
def standard_rows(sample_rows):
    return [r for r in sample_rows if isinstance(r["chosen"], str) and "prompt" in r][:40]


@pytest.fixture(scope="module")
def conversational_rows(sample_rows):
    rows = [r for r in sample_rows if isinstance(r["chosen"], list) and "prompt" in r][:20]
    assert rows, "sample data should have conversational rows"
    return rows


# --- ids built by hand ---

def test_the_chat_template_is_the_documented_one(tokenizer, conversational_rows):
    # Guards the hand rendering used below: if the template changes, these tests must change too.
    for row in conversational_rows[:3]:
        assert tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) \
            == hand_render(row["prompt"], True)


def test_standard_ids_by_hand(tokenizer, standard_rows):
    eos = tokenizer.eos_token_id
    for row in standard_rows:
        pair = tokenize_pair(row_example(row), tokenizer, BIG)
        assert isinstance(pair, TokenizedPair)
        assert pair.prompt_ids == ids(tokenizer, row["prompt"], True), row["id"]
        assert pair.chosen_ids == ids(tokenizer, row["chosen"], False) + [eos], row["id"]
        assert pair.rejected_ids == ids(tokenizer, row["rejected"], False) + [eos], row["id"]
        assert not pair.prompt_shrunk


def test_standard_matches_the_anchor_example(tokenizer):
    # ANCHORS.md "Observed on TRL 1.16.0" shows the shape: one BOS, the completion, one EOS.
    pair = tokenize_pair(example("Sort ascending: 42 643\nAnswer:", " 42 643", " 643 42"), tokenizer, BIG)
    assert pair.prompt_ids[0] == tokenizer.bos_token_id
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tokenizer.eos_token_id
    assert pair.prompt_ids + pair.chosen_ids == ids(tokenizer, "Sort ascending: 42 643\nAnswer: 42 643</s>", True)


def test_conversational_ids_by_hand(tokenizer, conversational_rows):
    for row in conversational_rows:
        pair = tokenize_pair(row_example(row), tokenizer, BIG)
        assert pair.prompt_ids == ids(tokenizer, hand_render(row["prompt"], True), False), row["id"]
        for side, got in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            full = ids(tokenizer, hand_render(row["prompt"] + row[side], False), False)
            assert pair.prompt_ids + got == full, row["id"]
            # The completion is the assistant's text plus the template's end-of-turn, no EOS.
            (message,) = row[side]
            assert got == ids(tokenizer, message["content"] + "<|end|>\n", False), row["id"]
            assert tokenizer.eos_token_id not in got


def test_bos_exactly_once(tokenizer, standard_rows, conversational_rows):
    bos = tokenizer.bos_token_id
    for row in standard_rows[:10] + conversational_rows[:10]:
        pair = tokenize_pair(row_example(row), tokenizer, BIG)
        for completion in (pair.chosen_ids, pair.rejected_ids):
            seq = pair.prompt_ids + completion
            assert seq[0] == bos and seq.count(bos) == 1, row["id"]


def test_eos_appended_once_and_not_doubled(tokenizer, standard_rows):
    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    row = standard_rows[0]
    plain = tokenize_pair(row_example(row), tokenizer, BIG)
    with_eos = tokenize_pair(example(row["prompt"], row["chosen"] + eos_text, row["rejected"] + eos_text),
                             tokenizer, BIG)
    assert with_eos == plain
    for completion in (plain.chosen_ids, plain.rejected_ids):
        assert completion[-1] == eos and completion.count(eos) == 1
    # Only one side ending with EOS: each side still ends with exactly one.
    mixed = tokenize_pair(example(row["prompt"], row["chosen"] + eos_text, row["rejected"]), tokenizer, BIG)
    assert mixed == plain


def test_prompt_gets_no_eos(tokenizer):
    pair = tokenize_pair(example("Say hi.\nAnswer:", " hi", " bye"), tokenizer, BIG)
    assert tokenizer.eos_token_id not in pair.prompt_ids


# --- truncation and drops ---

def test_keep_start_truncation_cuts_the_completion_end(tokenizer, standard_rows):
    row = max(standard_rows, key=lambda r: len(r["chosen"]))
    eos = tokenizer.eos_token_id
    prompt = ids(tokenizer, row["prompt"], True)
    chosen = ids(tokenizer, row["chosen"], False) + [eos]
    rejected = ids(tokenizer, row["rejected"], False) + [eos]
    assert len(chosen) > 4
    for room in (1, 3, len(chosen) - 1, len(chosen), len(chosen) + 5):
        pair = tokenize_pair(row_example(row), tokenizer, len(prompt) + room)
        assert pair.prompt_ids == prompt  # the prompt is never cut
        assert pair.chosen_ids == chosen[:room]
        assert pair.rejected_ids == rejected[:room]
        assert len(pair.prompt_ids) + len(pair.chosen_ids) <= len(prompt) + room
        # EOS survives only when the whole completion fits.
        assert (pair.chosen_ids[-1] == eos) == (room >= len(chosen))


def test_conversational_truncation(tokenizer, conversational_rows):
    row = conversational_rows[0]
    prompt = ids(tokenizer, hand_render(row["prompt"], True), False)
    full = ids(tokenizer, hand_render(row["prompt"] + row["chosen"], False), False)
    pair = tokenize_pair(row_example(row), tokenizer, len(prompt) + 2)
    assert pair.prompt_ids == prompt and pair.chosen_ids == full[len(prompt):len(prompt) + 2]


def test_prompt_too_long_is_dropped(tokenizer, standard_rows, conversational_rows):
    for row, prompt in ((standard_rows[0], ids(tokenizer, standard_rows[0]["prompt"], True)),
                        (conversational_rows[0],
                         ids(tokenizer, hand_render(conversational_rows[0]["prompt"], True), False))):
        for max_length in (len(prompt) - 5, len(prompt) - 1, len(prompt)):
            assert tokenize_pair(row_example(row), tokenizer, max_length) == Dropped(DROP_PROMPT_TOO_LONG)
        kept = tokenize_pair(row_example(row), tokenizer, len(prompt) + 1)
        assert isinstance(kept, TokenizedPair) and len(kept.chosen_ids) == len(kept.rejected_ids) == 1


# --- implicit prompts ---

def test_implicit_prompt_rows(tmp_path, tokenizer, standard_rows, conversational_rows):
    """A row without a prompt column gives the same ids as the explicit row, when the completions
    differ from their first word on (so the common prefix is exactly the prompt)."""
    std = [r for r in standard_rows if r["chosen"][:2] != r["rejected"][:2]
           and r["chosen"].startswith(" ") and r["rejected"].startswith(" ")][:5]
    conv = [r for r in conversational_rows if r["chosen"] != r["rejected"]][:5]
    assert std and conv
    implicit = [{"id": r["id"], "chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in std + conv]
    examples = read_examples(write_jsonl(tmp_path / "implicit.jsonl", implicit)).examples
    got = {ex.id: tokenize_pair(ex, tokenizer, BIG) for ex in examples}
    for row in std + conv:
        assert got[row["id"]] == tokenize_pair(row_example(row), tokenizer, BIG), row["id"]


# --- TRL fixture ---

@pytest.fixture(scope="module")
def trl_fixture(tokenizer):
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer), (
        "fixture is stale: rerun tests/fixtures/make_trl_ids.py (sample_data/tiny-llama's tokenizer changed)")
    return fixture


def fixture_example(row: dict) -> Example:
    """The Example dpocli's reader would build: implicit prompts split with TRL's rule."""
    if "prompt" in row:
        return row_example(row)
    return example(*extract_prompt(row["chosen"], row["rejected"]), id=row["id"])


def test_trl_fixture_covers_every_case(trl_fixture):
    groups = trl_fixture["groups"]
    assert trl_fixture["trl_version"] == "1.16.0"
    assert set(groups) == {"standard", "conversational", "standard_eos", "standard_implicit",
                           "conversational_implicit", "conversational_assistant_last"}
    assert sum(len(g) for g in groups.values()) >= 20 and all(groups.values())
    rows = [r for g in groups.values() for r in g]
    for length in trl_fixture["max_lengths"]:
        results = [r["truncated"][str(length)] for r in rows]
        assert any(t is None for t in results) and any(t is not None for t in results)
    # Some completion is cut at the first max_length: truncation is exercised, not just drops.
    first = str(trl_fixture["max_lengths"][0])
    assert any(r["truncated"][first] and len(r["truncated"][first]["chosen"]["input_ids"])
               < len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows)


@pytest.mark.parametrize("group", ["standard", "conversational", "standard_eos", "standard_implicit",
                                   "conversational_implicit", "conversational_assistant_last"])
def test_ids_equal_trl(trl_fixture, tokenizer, group):
    for entry in trl_fixture["groups"][group]:
        pair = tokenize_pair(fixture_example(entry["row"]), tokenizer, BIG)
        assert isinstance(pair, TokenizedPair)
        assert pair.prompt_ids == entry["prompt_ids"], entry["row"]["id"]
        assert pair.chosen_ids == entry["chosen_ids"], entry["row"]["id"]
        assert pair.rejected_ids == entry["rejected_ids"], entry["row"]["id"]


def test_truncation_and_drops_equal_trl(trl_fixture, tokenizer):
    for length in trl_fixture["max_lengths"]:
        for group in trl_fixture["groups"].values():
            for entry in group:
                pair = tokenize_pair(fixture_example(entry["row"]), tokenizer, length)
                trl = entry["truncated"][str(length)]
                where = (entry["row"]["id"], length)
                if trl is None:
                    assert pair == Dropped(DROP_PROMPT_TOO_LONG), where
                    continue
                assert isinstance(pair, TokenizedPair), where
                assert pair.prompt_ids == trl["prompt_ids"], where
                for completion, seq in ((pair.chosen_ids, trl["chosen"]), (pair.rejected_ids, trl["rejected"])):
                    assert pair.prompt_ids + completion == seq["input_ids"], where
                    assert [0] * len(pair.prompt_ids) + [1] * len(completion) == seq["completion_mask"], where


# --- fingerprint and padding ---

def test_fingerprint_is_stable_and_sensitive(tokenizer, model_dir):
    from transformers import AutoTokenizer
    base = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_dir)) == base  # reload: same

    other_template = copy.deepcopy(tokenizer)
    other_template.chat_template = tokenizer.chat_template.replace("<|end|>", "<|end|>\n")
    assert tokenizer_fingerprint(other_template) != base

    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    assert tokenizer_fingerprint(no_template) != base

    more_vocab = copy.deepcopy(tokenizer)
    assert more_vocab.add_tokens(["zzqqxx_new_token"]) == 1
    assert tokenizer_fingerprint(more_vocab) != base

    other_eos = copy.deepcopy(tokenizer)
    other_eos.eos_token = "<|end|>"
    assert tokenizer_fingerprint(other_eos) != base
    assert tokenizer_fingerprint(tokenizer) == base  # the copies did not touch the original


def test_pad_token_id(tokenizer):
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id == 0
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert pad_token_id(no_pad) == tokenizer.eos_token_id
