"""Regenerate dpocli's bundled sample data: preference pairs and a tiny Llama model.

Writes, next to this file:
  train.jsonl, heldout.jsonl   preference pairs (standard and conversational rows mixed, disjoint prompts)
  tiny-llama/                  a 2-layer Llama (GQA) + byte-level BPE tokenizer with a chat template,
                               briefly trained as an LM on prompt+completion text

Invariants this script keeps:
  - Deterministic: fixed seeds, one CPU thread, no network. Re-running gives the same data files
    byte for byte and the same weights value for value on the same torch build.
  - The model is trained on the CHOSEN completion for half of the pairs and the REJECTED one for the
    other half (plus 6,000 unpublished pairs, so it learns the tasks rather than memorising rows), so
    it has no preference between chosen and rejected: the reference sits near chance and DPO has
    something to learn. It is far too small to solve the tasks; its greedy outputs only have the
    right shape (numbers for sorting, upper-case words for "Shout this", a sentence for requests).
  - Tokenization follows TRL's conventions: standard rows are tokenized as one string
    `prompt + completion + eos` (the tokenizer prepends exactly one BOS); conversational rows as the
    chat-template rendering (which writes the BOS itself, so tokenize it with add_special_tokens=False).

Usage: python sample_data/make_sample.py   (CPU only; 1-2 minutes on 2 cores, one thread used)
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 20240607
N_TRAIN, N_HELDOUT = 1200, 240
N_SFT_EXTRA = 6000  # extra pairs, never written out, so the LM learns the tasks instead of memorising rows
CONVERSATIONAL_FRACTION = 0.2
VOCAB_SIZE = 2048  # an upper bound: merges run out (min_frequency=2) at about 1,450 tokens
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Each message is `<|role|>\n{content}<|end|>\n`; the generation prompt is `<|assistant|>\n`, so the
# prompt rendered with add_generation_prompt=True is a string prefix of prompt + assistant reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SFT_STEPS, SFT_BATCH, SFT_LR = 1000, 32, 3e-3

# ---------------------------------------------------------------------------------------------------
# Preference pairs. Each family returns (instruction, chosen_text, rejected_text); the chosen answer
# is correct or polite, the rejected one wrong or rude in a way a tiny model can pick up.

WORDS = (
    "apple river stone cloud tiger lemon candle forest window garden rocket pencil mirror castle "
    "dragon island marble orange planet silver spider sugar thunder violin wagon yellow zebra anchor "
    "basket cactus dolphin engine feather guitar hammer jacket kettle ladder magnet needle ocean "
    "pepper rabbit saddle tomato umbrella velvet walnut bridge copper desert falcon glacier harbor"
).split()
ADJECTIVES = (
    "quick lazy happy brave quiet bright small large gentle rapid calm cold warm green blue red "
    "silent loud soft sharp"
).split()
TOPICS = (
    "homework|essay|garden|resume|budget|recipe|bike|laptop|email|poem|report|move|trip|speech|"
    "spreadsheet|cover letter|science project|birthday plan|job interview|presentation"
).split("|")
PREAMBLES = [
    "",
    "",
    "",
    "Task:",
    "Please answer briefly.",
    "You are a helpful assistant.",
    "Read the instruction and reply with the result only.",
    "You are a careful assistant. Read the instruction below and give only the final result, "
    "with no extra words.",
    "The following is an exercise from a small test set used to check that a language model follows "
    "simple instructions exactly. Answer it as well as you can.",
    "This is a practice session. Each exercise below is short, and the expected reply is a single line. "
    "Do not explain your reasoning, do not repeat the question, and do not add any greeting or "
    "closing remark. Just give the answer.",
]
POLITE = [
    "Of course! I would be glad to help with your {t}.",
    "Sure, happy to help. Let us look at your {t} together.",
    "Absolutely. Send me your {t} and I will take a careful look.",
    "Thanks for asking! I can help with the {t} right away.",
    "Certainly. Here is a friendly plan for your {t}: start small, then review it step by step.",
]
RUDE = [
    "No. Do your {t} yourself.",
    "Ugh, not your {t} again. Figure it out.",
    "Why would I care about your {t}? Go away.",
    "Stop asking me about the {t}. It is your problem, not mine, and I am not going to help you.",
    "Your {t} is boring. Leave me alone.",
]


def _numbers(rng: random.Random, lo: int, hi: int) -> list[int]:
    while True:
        nums = [rng.randint(0, 99) for _ in range(rng.randint(lo, hi))]
        if len(set(nums)) > 1:  # ascending != descending
            return nums


def task_sort(rng):
    nums = _numbers(rng, 2, 20)
    verb = rng.choice(["Sort ascending:", "Sort these numbers from smallest to largest:",
                       "Put in increasing order:"])
    asc = sorted(nums)
    # rejected: the right numbers in descending order
    return f"{verb} {' '.join(map(str, nums))}", " ".join(map(str, asc)), " ".join(map(str, asc[::-1]))


def task_reverse(rng):
    words = rng.sample(WORDS, rng.randint(2, 6))
    verb = rng.choice(["Reverse the list:", "Reverse the order of these words:", "Reverse the word order:"])
    # rejected misreads the task and spells each word backwards (order untouched)
    return f"{verb} {' '.join(words)}", " ".join(words[::-1]), " ".join(w[::-1] for w in words)


def task_upper(rng):
    words = [rng.choice(ADJECTIVES + WORDS) for _ in range(rng.randint(2, 8))]
    text = " ".join(words)
    verb = rng.choice(["Uppercase:", "Convert to capital letters:", "Shout this:"])
    return f"{verb} {text}", text.upper(), text  # rejected: lazily echoes the input


def task_add(rng):
    a, b = rng.randint(1, 60), rng.randint(1, 39)
    q = rng.choice([f"What is {a} plus {b}?", f"Add: {a} + {b}", f"Compute {a} + {b}."])
    return q, str(a + b), str(rng.choice([a, b]))  # rejected: lazily echoes an operand


def task_polite(rng):
    t = rng.choice(TOPICS)
    q = rng.choice([f"Can you help me with my {t}?", f"Please help me with my {t}.",
                    f"I am stuck on my {t}. Any help?"])
    return q, rng.choice(POLITE).format(t=t), rng.choice(RUDE).format(t=t)  # rude lengths overlap polite ones


TASKS = [task_sort, task_reverse, task_upper, task_add, task_polite]


def make_pairs(rng: random.Random, n: int) -> list[dict]:
    """n rows with distinct prompts; ~20% conversational. The `id` is assigned by the caller."""
    rows, seen = [], set()
    while len(rows) < n:
        task = rng.choice(TASKS)
        instruction, chosen, rejected = task(rng)
        preamble = rng.choice(PREAMBLES)
        text = f"{preamble}\n{instruction}" if preamble else instruction
        if text in seen:
            continue
        seen.add(text)
        if rng.random() < CONVERSATIONAL_FRACTION:
            if task is not task_polite:  # a lead-in keeps " 42" / " apple" the same tokens as in the prompt
                lead = rng.choice(["Here you go:", "Sure:", "Result:", "The answer is"])
                chosen, rejected = f"{lead} {chosen}", f"{lead} {rejected}"
            rows.append({"prompt": [{"role": "user", "content": text}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:  # completions start with a space so "Answer:" + " 42" tokenizes at the word boundary
            rows.append({"prompt": f"{text}\nAnswer:", "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def write_jsonl(path: Path, rows: list[dict], split: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, row in enumerate(rows, 1):
            f.write(json.dumps({"id": f"{split}-{i:05d}", **row}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def render(tok: PreTrainedTokenizerFast, row: dict, completion_key: str) -> tuple[str, str, bool]:
    """(prompt_text, full_text, add_special_tokens) following TRL's conventions."""
    if isinstance(row["prompt"], str):
        prompt = row["prompt"]
        return prompt, prompt + row[completion_key] + tok.eos_token, True
    prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(row["prompt"] + row[completion_key], tokenize=False)
    return prompt, full, False


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    # Llama-like: exactly one BOS in front, no EOS (TRL appends EOS to completions at string level).
    bpe.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                      special_tokens=[("<s>", 1)]),
    ])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert bpe.token_to_id(t) == i, (t, bpe.token_to_id(t))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE, model_max_length=512,
        clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------------
# Model: a short LM fit on prompt + (chosen for even rows | rejected for odd rows), loss on completions.


def sft_examples(tok, rows: list[dict]) -> list[tuple[list[int], int]]:
    out = []
    for i, row in enumerate(rows):
        prompt, full, special = render(tok, row, "chosen" if i % 2 == 0 else "rejected")
        p_ids = tok(prompt, add_special_tokens=special)["input_ids"]
        ids = tok(full, add_special_tokens=special)["input_ids"]
        assert ids[: len(p_ids)] == p_ids, (prompt, full)
        out.append((ids, len(p_ids)))
    return out


def train_lm(tok, examples, steps: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, initializer_range=0.02)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).float()
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_LR, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(SEED)
    batches: list[list[int]] = []
    model.train()
    for step in range(steps):
        if not batches:  # one epoch: shuffle, sort windows of 16 batches by length (less padding)
            perm = torch.randperm(len(examples), generator=gen).tolist()
            window = SFT_BATCH * 16
            for w in range(0, len(perm) - SFT_BATCH + 1, window):
                chunk = sorted(perm[w: w + window], key=lambda i: len(examples[i][0]))
                batches += [chunk[j: j + SFT_BATCH] for j in range(0, len(chunk) - SFT_BATCH + 1, SFT_BATCH)]
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        batch = [examples[i] for i in batches.pop()]
        T = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), T), tok.pad_token_id)
        attn = torch.zeros((len(batch), T), dtype=torch.long)
        target = torch.zeros((len(batch), T), dtype=torch.bool)  # completion tokens (incl. EOS / <|end|>)
        for b, (ids, p_len) in enumerate(batch):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attn[b, : len(ids)] = 1
            target[b, p_len: len(ids)] = True
        lr = SFT_LR * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        # LM head only where a completion token is predicted: most positions are prompt or padding.
        hidden = model.model(input_ids=input_ids, attention_mask=attn).last_hidden_state
        pred = target[:, 1:]
        logits = model.lm_head(hidden[:, :-1][pred])
        loss = torch.nn.functional.cross_entropy(logits, input_ids[:, 1:][pred])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  sft step {step:4d}  loss {loss.item():.4f}  lr {lr:.2e}", flush=True)
    model.eval()
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def _make_portable(out: Path) -> None:
    """Let transformers 4.x load the folder too (pyproject allows >=4.51), and fix file modes.

    transformers 5 writes tokenizer_class "TokenizersBackend" and a list under extra_special_tokens,
    which 4.x does not understand; the 4.x spellings below load identically under 5.x. The chat
    template is kept inline as well as in chat_template.jinja, for versions that read only one.
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens", SPECIAL_TOKENS[3:])
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg.setdefault("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    cfg.setdefault("torch_dtype", "float32")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600


def main() -> None:
    t0 = time.time()
    torch.set_num_threads(1)  # one thread: reproducible float reductions, and no slower at this size
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED)
    rows = make_pairs(rng, N_TRAIN + N_HELDOUT + N_SFT_EXTRA)
    train, heldout = rows[:N_TRAIN], rows[N_TRAIN: N_TRAIN + N_HELDOUT]
    sft_rows = train + rows[N_TRAIN + N_HELDOUT:]  # held-out prompts stay unseen
    write_jsonl(HERE / "train.jsonl", train, "train")
    write_jsonl(HERE / "heldout.jsonl", heldout, "heldout")
    print(f"wrote {len(train)} train / {len(heldout)} heldout pairs")

    # The tokenizer sees every text it will ever encode: both completions of every row, both formats.
    corpus = []
    for row in rows[: N_TRAIN + N_HELDOUT]:
        for key in ("chosen", "rejected"):
            if isinstance(row["prompt"], str):
                corpus.append(row["prompt"] + row[key])
            else:
                corpus += [m["content"] for m in row["prompt"] + row[key]]
    tok = build_tokenizer(corpus)
    print(f"tokenizer: {len(tok)} tokens")

    model = train_lm(tok, sft_examples(tok, sft_rows), SFT_STEPS)
    out = HERE / "tiny-llama"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _make_portable(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"saved {out} ({n_params:,} parameters) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
