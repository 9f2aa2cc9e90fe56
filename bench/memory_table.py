"""The README's memory table for 8B and 70B on nodes of 8x80 GB GPUs, computed from formulas.

Run `python bench/memory_table.py` to print it; tests/test_memory_table.py checks the parameter
counter against transformers (a model built on the meta device) and the table against these
formulas. All sizes in GB (1e9 bytes). Symbols: P parameters, N GPUs sharing the model, L layers,
h hidden size, i MLP size, V vocabulary, T tokens per micro-batch per GPU.

Per GPU (FSDP2, full sharding, one decoder layer all-gathered at a time, plus the next one
prefetched):
* precompute-ref --fsdp (forward only, bf16): 2P/N (shard) + 2 x 2*P_layer (gathered layers)
  + activations of one layer T*(4h + 2i)*2 + one LM-head chunk of 1024 tokens x V fp32.
* train, bf16 compute with fp32 master weights (--autocast bfloat16): 16P/N (fp32 weights 4,
  gradients 4, Adam moments 8 bytes per parameter) + the same gathered layers; with activation
  checkpointing (--gradient-checkpointing) the saved activations are one bf16 hidden state per
  layer, 2*T*h*L, plus one layer's recomputed working set.
* train with bf16 weights (--dtype bfloat16, Adam moments in bf16 too): 8P/N + the same.
Checkpoints (DCP, every rank writes its shard): weights + Adam moments, 12P bytes (fp32) or 6P
(bf16); the final model is 2P (bf16) or 4P (fp32) bytes of safetensors.
Host RAM per node: each of the 8 processes holds its runtime (~3 GB with CUDA) plus, while
loading, one full parameter (the largest is the embedding, V*h*2 bytes); nothing scales with P.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GPU_GB = 80
GPUS_PER_NODE = 8
PROCESS_HOST_GB = 3.0  # torch + CUDA context + transformers, per process (measured order)
TOKENS = 8192  # T: e.g. 4 pairs x 2 sequences x 1024 tokens per micro-batch per GPU
HEAD_CHUNK = 1024  # tokens per LM-head chunk (dpocli's default --chunk-size)


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False


LLAMA3_8B = Shape("Llama-3 8B", 32, 4096, 14336, 32, 8, 128256)
LLAMA3_70B = Shape("Llama-3 70B", 80, 8192, 28672, 64, 8, 128256)


def layer_params(s: Shape) -> int:
    """q, o: h*h each; k, v: h*(h/heads*kv_heads) each; gate, up, down: 3*h*i; two RMSNorms."""
    kv = s.hidden // s.heads * s.kv_heads
    return 2 * s.hidden * s.hidden + 2 * s.hidden * kv + 3 * s.hidden * s.intermediate + 2 * s.hidden


def count_params(s: Shape) -> int:
    embeddings = s.vocab * s.hidden * (1 if s.tied else 2)
    return s.layers * layer_params(s) + embeddings + s.hidden  # + the final norm


def per_gpu(s: Shape, gpus: int) -> dict:
    p, lp = count_params(s), layer_params(s)
    gathered = 2 * 2 * lp / GB  # the layer in use and the prefetched one, bf16
    layer_act = TOKENS * (4 * s.hidden + 2 * s.intermediate) * 2 / GB
    head = HEAD_CHUNK * s.vocab * 4 / GB
    saved = 2 * TOKENS * s.hidden * s.layers / GB  # activation checkpointing: one state per layer
    return {
        "precompute": 2 * p / gpus / GB + gathered + layer_act + head,
        "train_fp32_master": 16 * p / gpus / GB + gathered + saved + layer_act + head,
        "train_bf16": 8 * p / gpus / GB + gathered + saved + layer_act + head,
    }


def gpus_needed(s: Shape, key: str) -> int:
    """The fewest whole nodes' GPUs on which `key` fits in 90% of GPU memory."""
    gpus = GPUS_PER_NODE
    while per_gpu(s, gpus)[key] > 0.9 * GPU_GB:
        gpus += GPUS_PER_NODE
    return gpus


def rows() -> list[dict]:
    out = []
    for s in (LLAMA3_8B, LLAMA3_70B):
        p = count_params(s)
        one_node = per_gpu(s, GPUS_PER_NODE)
        out.append({
            "model": s.name, "params_b": p / 1e9,
            "precompute_gb": one_node["precompute"],
            "precompute_one_gpu_gb": 2 * p / GB,  # without --fsdp: the whole bf16 reference
            "train_fp32_master_gb": one_node["train_fp32_master"],
            "train_bf16_gb": one_node["train_bf16"],
            "gpus_fp32_master": gpus_needed(s, "train_fp32_master"),
            "gpus_bf16": gpus_needed(s, "train_bf16"),
            "checkpoint_fp32_gb": 12 * p / GB, "checkpoint_bf16_gb": 6 * p / GB,
            "final_bf16_gb": 2 * p / GB,
            "host_ram_gb": GPUS_PER_NODE * (PROCESS_HOST_GB + s.vocab * s.hidden * 2 / GB),
            "full_state_host_gb": 16 * p / GB,  # what the old rank-0 gather needed
        })
    return out


def render() -> str:
    lines = [
        "| | params | precompute --fsdp, per GPU (1 GPU without) | train, fp32 master + bf16, per GPU "
        "| train, bf16 weights, per GPU | checkpoint (DCP) fp32 / bf16 | final model (bf16) "
        "| host RAM per node |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows():
        s = LLAMA3_8B if r["model"] == LLAMA3_8B.name else LLAMA3_70B

        def fits(gb, gpus, key, s=s):
            if gpus == GPUS_PER_NODE:
                return f"{gb:.1f} GB"
            return f"{gb:.0f} GB: does not fit; {gpus} GPUs: {per_gpu(s, gpus)[key]:.1f} GB"
        lines.append(
            f"| {r['model']} | {r['params_b']:.2f}B | {r['precompute_gb']:.1f} GB "
            f"({r['precompute_one_gpu_gb']:.0f} GB) "
            f"| {fits(r['train_fp32_master_gb'], r['gpus_fp32_master'], 'train_fp32_master')} "
            f"| {fits(r['train_bf16_gb'], r['gpus_bf16'], 'train_bf16')} "
            f"| {r['checkpoint_fp32_gb']:.0f} / {r['checkpoint_bf16_gb']:.0f} GB "
            f"| {r['final_bf16_gb']:.0f} GB | {r['host_ram_gb']:.0f} GB |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
