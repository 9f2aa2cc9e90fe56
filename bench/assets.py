"""Deterministic benchmark assets: the medium random-init Llama and the synthetic preference data.

Nothing here needs TRL; it runs under the main environment (`python bench/assets.py --help`).

* tiny   = sample_data/tiny-llama (2 layers, hidden 64, vocab 1413), used as is.
* medium = a Llama-shaped random init (hidden 384, 4 layers, 6 heads / 2 KV heads, MLP 1024,
           vocab 32768, untied head: ~31M parameters), saved under bench/models/medium-llama with the
           sample tokenizer. The tokenizer only knows 1413 ids, so every id fed to the model is
           < 1413 < 32768; only the vocabulary *dimension* (embedding + LM head cost) matters here.
* data   = plain-string (non-conversational) rows {"id", "prompt", "chosen", "rejected"} whose
           prompts are PROMPT_TOKENS tokens and completions COMPLETION_TOKENS tokens under the sample
           tokenizer (TRL conventions: BOS on the prompt, EOS appended to each completion).
           Plain strings only, because a `datasets.Dataset` column cannot mix strings and message lists
           (sample_data/train.jsonl mixes both, so TRL cannot load it as one dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TINY_MODEL = REPO / "sample_data" / "tiny-llama"
MEDIUM_MODEL = BENCH / "models" / "medium-llama"
DATA_DIR = BENCH / "data"

PROMPT_TOKENS = (100, 250)
COMPLETION_TOKENS = (50, 150)
SEED = 1234

MEDIUM_CONFIG = dict(vocab_size=32768, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0, initializer_range=0.02, attention_dropout=0.0)
# ~60M: the issue-25 workload (hidden 512, 8 layers, 8 query / 2 KV heads, MLP 1536, vocab 32768,
# untied head: 57.7M parameters, 33.6M of them embedding + LM head).
LARGE_MODEL = BENCH / "models" / "llama-60m"
LARGE_CONFIG = {**MEDIUM_CONFIG, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                "num_attention_heads": 8, "num_key_value_heads": 2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Qwen2.5-0.5B's shapes (bench/gpu_bench.py): 24 layers, hidden 896, 14 query / 2 KV heads, MLP 4864,
# vocab 151,936, tied embeddings (~494M parameters). Random init; the sample tokenizer feeds it ids
# < 1445, so as for the medium model only the vocabulary *dimension* matters.
QWEN05_CONFIG = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=0.0)
# The same architecture, small enough for a CPU smoke run of the GPU script.
QWEN_SMOKE_CONFIG = {**QWEN05_CONFIG, "vocab_size": 1445, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}

WORDS = (
    "apple river stone cloud tiger lemon candle forest window garden rocket pencil mirror castle "
    "dragon island marble orange planet silver spider sugar thunder violin wagon yellow zebra anchor "
    "basket cactus dolphin engine feather guitar hammer jacket kettle ladder magnet needle ocean "
    "pepper rabbit saddle tomato umbrella velvet walnut bridge copper desert falcon glacier harbor "
    "quick lazy happy brave quiet bright small large gentle rapid calm cold warm green blue red "
    "silent loud soft sharp the a of and to in is was for on with as by at from"
).split()


TINY_SNAPSHOT = BENCH / "models" / "tiny-llama"


def snapshot_tiny() -> Path:
    """Copy sample_data/tiny-llama to bench/models/tiny-llama, so the model cannot change while a
    benchmark runs (sample_data/make_sample.py rewrites it in place)."""
    if not (TINY_MODEL / "config.json").exists():
        raise SystemExit(f"tiny model not found: {TINY_MODEL}")
    tmp = TINY_SNAPSHOT.with_name("tiny-llama.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(TINY_MODEL, tmp)
    shutil.rmtree(TINY_SNAPSHOT, ignore_errors=True)
    tmp.rename(TINY_SNAPSHOT)
    return TINY_SNAPSHOT


def build_medium_model(force: bool = False, path: Path = MEDIUM_MODEL, config: dict = MEDIUM_CONFIG) -> Path:
    """Random-init Llama, deterministic (fixed seed, CPU); `path`/`config`: another size
    (`build_large_model`)."""
    if (path / "model.safetensors").exists() and not force:
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (TINY_MODEL / name).exists():
            shutil.copy(TINY_MODEL / name, path / name)
    return path


def build_large_model(force: bool = False) -> Path:
    """The ~60M Llama (LARGE_CONFIG) under bench/models/llama-60m."""
    return build_medium_model(force, LARGE_MODEL, LARGE_CONFIG)


def build_qwen_model(name: str, config: dict, dtype: str, force: bool = False) -> Path:
    """Random-init Qwen2 with `config` saved in `dtype` under bench/models/<name> with the sample
    tokenizer; deterministic (fixed seed, initialised on CPU). Writes bench_model.json with the
    parameter count (tied embeddings counted once), which the MFU figures use."""
    path = BENCH / "models" / name
    if (path / "bench_model.json").exists() and not force:
        return path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(Qwen2Config(**config)).to(getattr(torch, dtype)).eval()
    n_params = sum(p.numel() for p in model.parameters())  # .parameters() yields a tied weight once
    tmp = path.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for file in TOKENIZER_FILES:
        if (TINY_MODEL / file).exists():
            shutil.copy(TINY_MODEL / file, tmp / file)
    (tmp / "bench_model.json").write_text(json.dumps({"n_params": n_params, "config": config,
                                                      "dtype": dtype, "seed": SEED}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS) if rng.random() < 0.85 else str(rng.randint(0, 999))


def _text_of_tokens(rng: random.Random, tokenizer, target: int, lead: str = "") -> str:
    """Whitespace-joined words whose tokenization (no special tokens) has exactly `target` tokens
    (or one fewer if the last word does not fit).

    Same text and same rng consumption as adding one word at a time and stopping at the first
    word that overflows (the token count only grows as words are appended), but words are tried
    16, then 4, then 1 at a time, rewinding the rng when a group overflows: ~300-token texts
    would otherwise cost one tokenizer call per word."""
    def count(ws: list[str]) -> int:
        return len(tokenizer(lead + " ".join(ws), add_special_tokens=False)["input_ids"])

    words: list[str] = []
    step = 16
    while True:
        state = rng.getstate()
        trial = words + [_word(rng) for _ in range(step)]
        if count(trial) <= target:
            words = trial
        elif step == 1:
            return lead + " ".join(words)  # the overflowing word stays drawn, as one at a time
        else:
            rng.setstate(state)
            step //= 4


def build_data(n_pairs: int, force: bool = False, prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
               completion_tokens: tuple[int, int] = COMPLETION_TOKENS,
               tokenizer_dir: Path = TINY_MODEL) -> Path:
    """`n_pairs` synthetic rows; chosen = the prompt's last words reversed-ish, rejected = random.
    Token counts are drawn uniformly from the (inclusive) ranges, under the tokenizer that
    AutoTokenizer loads from `tokenizer_dir` (for a Qwen2 model folder transformers picks
    Qwen2Tokenizer over the same files, which splits text differently)."""
    name = f"synthetic-{n_pairs}"
    if (prompt_tokens, completion_tokens) != (PROMPT_TOKENS, COMPLETION_TOKENS):
        name += f"-p{prompt_tokens[0]}-{prompt_tokens[1]}-c{completion_tokens[0]}-{completion_tokens[1]}"
    if Path(tokenizer_dir) != TINY_MODEL:
        name += f"-tok-{Path(tokenizer_dir).name}"
    path = DATA_DIR / f"{name}.jsonl"
    if path.exists() and not force:
        return path
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(SEED)
    rows = []
    for i in range(n_pairs):
        # Prompt target counts BOS; completion target counts the appended EOS.
        p_len = rng.randint(*prompt_tokens) - 1
        c_len = rng.randint(*completion_tokens) - 1
        r_len = rng.randint(*completion_tokens) - 1
        prompt = _text_of_tokens(rng, tokenizer, p_len - 3, "Continue the list: ") + "\nAnswer:"
        chosen = _text_of_tokens(rng, tokenizer, c_len, " ")
        rejected = _text_of_tokens(rng, tokenizer, r_len, " ")
        if rejected == chosen:
            rejected += " no"
        rows.append({"id": f"bench-{i:05d}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def pair_token_counts(path: Path, tokenizer_dir: Path = TINY_MODEL) -> tuple[list[int], list[int], list[int]]:
    """Per pair (prompt, chosen, rejected) token counts under TRL's conventions (prompt with BOS,
    completion + EOS), no truncation."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    p, c, r = [], [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        p.append(len(prompt_ids))
        for key, counts in (("chosen", c), ("rejected", r)):
            ids = tokenizer(row["prompt"] + row[key] + tokenizer.eos_token)["input_ids"]
            counts.append(len(ids) - len(prompt_ids))
    return p, c, r


def token_stats(path: Path, tokenizer_dir: Path = TINY_MODEL) -> dict:
    """Token counts under TRL's conventions (prompt with BOS, completion + EOS), no truncation."""
    p, c, r = pair_token_counts(path, tokenizer_dir)
    return {"pairs": len(p), "prompt_tokens": [min(p), sum(p) / len(p), max(p)],
            "chosen_tokens": [min(c), sum(c) / len(c), max(c)],
            "rejected_tokens": [min(r), sum(r) / len(r), max(r)],
            "completion_tokens_total": sum(c) + sum(r),
            "nonpad_tokens_total": 2 * sum(p) + sum(c) + sum(r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    print(build_medium_model(args.force))
    path = build_data(args.pairs, args.force)
    print(path, json.dumps(token_stats(path)))


if __name__ == "__main__":
    main()
