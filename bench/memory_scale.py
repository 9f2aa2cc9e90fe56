"""Per-rank peak RSS with and without FSDP2, on a random Llama whose weights dominate memory.

    PYTHONPATH=. python bench/memory_scale.py --params 350 --cache CACHE --prefs PREFS.jsonl

CACHE must be made with the sample model's tokenizer (e.g. `dpo precompute-ref
sample_data/train.jsonl --model sample_data/tiny-llama --out CACHE`): the random model carries that
tokenizer, so the cache fits it. Prints one JSON object: the peak RSS (the largest over ranks, as
`dpo ... --json` reports it) of `train` with a checkpoint every step on 1 process and on 2 ranks
with --fsdp, of `precompute-ref` on 1 process and with --fsdp, their ratios, and the bytes per
cached token that a process holds for CACHE (cache.CacheData). tests/test_memory.py is the small,
timed version of the same measurement.

    PYTHONPATH=. python bench/memory_scale.py --forward-only --prefs 32_ROWS.jsonl

Issue 23's measurement of the forward-only commands instead (no --cache needed): a random Llama
of 6 layers x 2048, vocabulary 8192, untied (342M parameters, 1.37 GB in fp32), `precompute-ref`
on 1 process with --batch-size 4 against 2 ranks --fsdp with --batch-size 2, then `dpo eval` of
the same model on the 1-process cache, 1 process against 2 ranks --fsdp. Every figure is each
process's own `VmHWM` (bench/rank_peak.py), in MiB, every rank listed; tests/test_memory_inference.py
is the small version.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "sample_data" / "tiny-llama"


def random_llama(folder: Path, millions: int) -> int:
    """A random Llama with 24 layers sized to about `millions` M parameters; returns the count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden = 1024 if millions <= 400 else 2048
    layers = max(1, round(millions * 1e6 / (12.3 * hidden * hidden)))
    config = LlamaConfig(vocab_size=1445, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY / name, folder / name)
    return count


def dpo(args: list, nproc: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "dpocli",
           *[str(a) for a in args], "--json", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout)


def wide_llama(folder: Path) -> int:
    """Issue 23's model: 6 layers x 2048, vocabulary 8192, untied; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=6,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY / name, folder / name)
    return count


def rank_peaks(args: list, nproc: int, folder: Path) -> list[float]:
    """Every rank's own peak (VmHWM, MiB) of `dpo ARGS` under torchrun (bench/rank_peak.py)."""
    folder.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "DPOCLI_PEAK_DIR": str(folder)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port), str(ROOT / "bench" / "rank_peak.py"),
           *[str(a) for a in args], "--json", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    files = sorted(folder.glob("rank-*.kb"), key=lambda p: int(p.stem.split("-")[1]))
    return [round(int(p.read_text()) / 1024) for p in files]


def forward_only(prefs: Path) -> dict:
    """Issue 23: per-rank peaks of precompute-ref and eval, one process against 2 ranks --fsdp."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        count = wide_llama(tmp / "model")
        pre = ["precompute-ref", prefs, "--model", tmp / "model"]
        pre_one = rank_peaks([*pre, "--out", tmp / "c1", "--batch-size", 4], 1, tmp / "p1")
        pre_two = rank_peaks([*pre, "--out", tmp / "c2", "--batch-size", 2, "--fsdp"], 2, tmp / "p2")
        ev = ["eval", tmp / "c1", "--model", tmp / "model"]
        eval_one = rank_peaks(ev, 1, tmp / "e1")
        eval_two = rank_peaks([*ev, "--fsdp"], 2, tmp / "e2")
    return {"params": count, "weights_mib_fp32": round(count * 4 / 2**20),
            "precompute_one_process_mib": pre_one[0], "precompute_fsdp_per_rank_mib": pre_two,
            "precompute_ratio": round(max(pre_two) / pre_one[0], 3),
            "eval_one_process_mib": eval_one[0], "eval_fsdp_per_rank_mib": eval_two,
            "eval_ratio": round(max(eval_two) / eval_one[0], 3)}


def cache_bytes_per_token(cache_dir: Path) -> float:
    """Bytes of the arrays (and row ids) a process holds for the cache, per stored token."""
    from dpocli.cache import store as cache
    _, data = cache.load_cache(cache_dir)
    arrays = sum(v.nbytes + o.nbytes for v, o in data.lists.values())
    arrays += sum(a.nbytes for a in data.scalars.values())
    arrays += data.source_row.nbytes + data.shard.nbytes + data.shard_position.nbytes
    arrays += sum(sys.getsizeof(i) for i in data.ids) + sys.getsizeof(data.ids)
    tokens = sum(len(v) for name, (v, _) in data.lists.items() if name.endswith("_ids"))
    return arrays / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=350, help="millions of parameters")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--prefs", type=Path, required=True, help="a few rows to precompute")
    parser.add_argument("--forward-only", action="store_true",
                        help="issue 23: precompute-ref and eval on the 6 x 2048 model")
    args = parser.parse_args()
    if args.forward_only:
        print(json.dumps(forward_only(args.prefs.resolve()), indent=2))
        return
    if args.cache is None:
        parser.error("--cache is required (except with --forward-only)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        count = random_llama(tmp / "model", args.params)
        train = ["train", args.cache, "--model", tmp / "model", "--max-steps", 2, "--save-every", 1,
                 "--no-shuffle", "--lr", "1e-5"]
        one = dpo([*train, "--out", tmp / "one", "--batch-size", 2], 1)["peak_rss_mb"]
        two = dpo([*train, "--out", tmp / "two", "--batch-size", 1, "--fsdp"], 2)["peak_rss_mb"]
        pre = ["precompute-ref", args.prefs, "--model", tmp / "model", "--batch-size", 2,
               "--rows-per-shard", 4]
        pre_one = dpo([*pre, "--out", tmp / "c1"], 1)["peak_rss_mb"]
        pre_two = dpo([*pre, "--out", tmp / "c2", "--fsdp"], 2)["peak_rss_mb"]
    print(json.dumps({
        "params": count, "weights_mb_fp32": round(count * 4 / 2**20),
        "train_one_process_mb": one, "train_fsdp_per_rank_mb": two, "train_ratio": round(two / one, 3),
        "precompute_one_process_mb": pre_one, "precompute_fsdp_per_rank_mb": pre_two,
        "precompute_ratio": round(pre_two / pre_one, 3),
        "cache_bytes_per_token": round(cache_bytes_per_token(args.cache), 2)}, indent=2))


if __name__ == "__main__":
    main()
