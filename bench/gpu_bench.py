"""dpocli vs TRL 1.16 on one GPU, bf16: the driver behind bench/gpu.sh (see RESULTS.md, "GPU").

    bash bench/gpu.sh            # the real run: one CUDA GPU, < 8 minutes on an H200
    bash bench/gpu.sh --smoke    # the same script end to end, tiny model on CPU (< 1 minute)

Model: a random-init Qwen2 with Qwen2.5-0.5B's shapes (bench/assets.py QWEN05_CONFIG, ~494M
parameters, bf16). Data: 256 synthetic pairs, prompt and each completion 280-320 tokens. Batch 8
pairs, one epoch (32 steps), sequential batches in both tools, lr 1e-6, beta 0.1.

Rows (each stage in its own process, through bench_vs_trl.py's runners):
  trl-default     DPOTrainer, reference model in memory (one reference forward per step)
  trl-precompute  DPOTrainer(precompute_ref_log_probs=True): reference pass, then training
  dpocli          dpo precompute-ref (default batching), then dpo train
  dpocli-pkps     both stages with --packing --prefix-sharing
  dpocli-pkps-flex  the same with DPOCLI_ATTN_KERNEL=flex (only with --flex; CUDA only, since
                  FlexAttention has no CPU backward)

Per row:
  train pairs/s, tokens/s  over steps 2..N (step 1 is warm-up, compilation included), wall time
                  between the ends of step 1 and step N; tokens/s counts the dataset's tokens
                  (prompt+chosen plus prompt+rejected per pair, what TRL's padded rows hold
                  without pads), so every row's tokens/s is comparable;
  MFU             achieved FLOPs / the GPU's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s),
                  achieved FLOPs = F · N · (tokens the row ran through the model per second), N
                  = parameter count (tied embeddings once), F = 6 for a training step (forward +
                  backward) plus 2 where TRL runs the reference forward inside the step
                  (trl-default), F = 2 for a reference pass. "Tokens run" is the logged
                  num_tokens (TRL's non-pad count) less, with prefix sharing, one prompt per pair. 6·N·T ignores
                  attention-score FLOPs (PaLM's 12·layers·hidden·seq per token, ≤ 5% here) and counts
                  the LM head on every token, although dpocli applies it to completion tokens only;
  peak GPU memory torch.cuda.max_memory_allocated() of each process (train and precompute apart
                  for dpocli; TRL's precompute pass shares its training process);
  precompute      reference-pass seconds (dpocli: _score_shard; TRL: _precompute_ref_logps plus
                  its weight hash), tokens/s and MFU on the same terms;
  pipeline wall   process launch to exit, summed over the row's processes (model loading,
                  tokenization and saving included).
Writes <out-dir>/gpu.json (raw) and <out-dir>/gpu.md (table); --smoke writes gpu-smoke.*.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402
from bench_vs_trl import dpocli_precompute, dpocli_train, fmt, machine_info, steady, trl_run  # noqa: E402

BENCH = assets.BENCH
PROFILES = {
    "gpu": dict(model="qwen2.5-0.5b-shape", config=assets.QWEN05_CONFIG, pairs=256,
                prompt_tokens=(280, 320), completion_tokens=(280, 320), batch_size=8,
                max_length=1024, device="cuda", dtype="bfloat16"),
    "smoke": dict(model="qwen-smoke", config=assets.QWEN_SMOKE_CONFIG, pairs=16,
                  prompt_tokens=(20, 40), completion_tokens=(20, 40), batch_size=4,
                  max_length=128, device="cpu", dtype="bfloat16"),
}
ROWS = ("trl-default", "trl-precompute", "dpocli", "dpocli-pkps", "dpocli-pkps-flex")
LABELS = {"trl-default": "TRL 1.16 default (reference model in memory)",
          "trl-precompute": "TRL 1.16 `precompute_ref_log_probs=True`",
          "dpocli": "dpocli precompute-ref + train",
          "dpocli-pkps": "dpocli, both `--packing --prefix-sharing`",
          "dpocli-pkps-flex": "dpocli, both `--packing --prefix-sharing`, `DPOCLI_ATTN_KERNEL=flex`"}
# Dense bf16 peak (no sparsity), TFLOP/s, from NVIDIA's data sheets; matched in order on the name.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0))
KERNEL_ENV = "DPOCLI_ATTN_KERNEL"


def gpu_info(python: str) -> dict:
    """Name and dense bf16 peak of GPU 0, probed in a child so this process never holds a CUDA
    context (it would sit in GPU memory beside every measured run)."""
    probe = "import torch;print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    name = subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip()
    return {"gpu": name or None, "peak_bf16_tflops": peak_tflops(name)}


def peak_tflops(gpu_name: str) -> float | None:
    """Dense bf16 peak for a device name ($GPU_PEAK_TFLOPS overrides); None when unknown, and
    then no MFU is reported rather than a guessed one."""
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    return next((t for key, t in PEAK_TFLOPS if key in gpu_name), None)


@contextmanager
def attention_kernel(name: str | None):
    """The child processes inherit os.environ: set the kernel for one row only."""
    saved = os.environ.pop(KERNEL_ENV, None)
    if name:
        os.environ[KERNEL_ENV] = name
    try:
        yield
    finally:
        os.environ.pop(KERNEL_ENV, None)
        if saved is not None:
            os.environ[KERNEL_ENV] = saved


def _mfu(flops_per_token: float, tokens_per_s: float | None, peak_tflops: float | None):
    if not peak_tflops or not tokens_per_s:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


def train_figures(rec: dict, step_dataset_tokens: list[int], n_params: int, flops_factor: int,
                  peak: float | None) -> dict:
    """Steady-state figures over steps 2..N (see the module docstring)."""
    st = steady(rec)
    ends = rec["step_end_s"]
    secs = ends[-1] - ends[0]
    dataset_tokens = sum(step_dataset_tokens[1:len(ends)])
    return {"steps": len(ends), "s_per_step": st["s_per_step"], "pairs_per_s": st["pairs_per_s"],
            "tokens_per_s": dataset_tokens / secs, "tokens_run_per_s": st["tokens_per_s"],
            "flops_per_token": flops_factor * n_params,
            "mfu": _mfu(flops_factor * n_params, st["tokens_per_s"], peak),
            "step1_s": st["step1_s"], "final_loss": float(rec["steps"][-1]["loss"])}


def precompute_figures(seconds: float, dataset_tokens: int, tokens_run: int, n_params: int,
                       peak: float | None) -> dict:
    return {"seconds": seconds, "tokens_per_s": dataset_tokens / seconds,
            "tokens_run_per_s": tokens_run / seconds,
            "mfu": _mfu(2 * n_params, tokens_run / seconds, peak)}


def run_rows(args, profile: dict, rows: list[str], workdir: Path) -> dict:
    model = assets.build_qwen_model(profile["model"], profile["config"], profile["dtype"])
    n_params = json.loads((model / "bench_model.json").read_text())["n_params"]
    data = assets.build_data(profile["pairs"], prompt_tokens=profile["prompt_tokens"],
                             completion_tokens=profile["completion_tokens"], tokenizer_dir=model)
    p, c, r = assets.pair_token_counts(data, model)
    b = profile["batch_size"]
    pair_tokens = [2 * x + y + z for x, y, z in zip(p, c, r)]  # TRL's non-pad tokens
    step_tokens = [sum(pair_tokens[i:i + b]) for i in range(0, len(p), b)]
    shared_tokens = sum(x + y + z for x, y, z in zip(p, c, r))  # the prompt run once
    gpu = gpu_info(sys.executable) if profile["device"] == "cuda" else {"gpu": None,
                                                                        "peak_bf16_tflops": None}
    peak = gpu["peak_bf16_tflops"]
    # What bench_vs_trl's runners read from their argparse namespace.
    run_args = argparse.Namespace(
        max_length=profile["max_length"], batch_size=b, lr=1e-6, beta=0.1, seed=42, epochs=1,
        steps=None, trl_steps=None, trl_python=args.trl_python, trl_optim="adamw_torch_fused",
        device=profile["device"], dtype=profile["dtype"])
    res = {"profile": args.profile, "settings": {k: v for k, v in profile.items() if k != "config"},
           "model": str(model), "model_config": profile["config"], "n_params": n_params,
           "data_file": str(data), "data": assets.token_stats(data, model), **gpu, "rows": {}}
    res["machine"] = machine_info(args.trl_python) if any(x.startswith("trl") for x in rows) else {}
    for name in rows:
        out = {"label": LABELS[name]}
        if name.startswith("trl"):
            pre = name == "trl-precompute"
            rec = trl_run(name, run_args, model, data, workdir, precompute=pre)
            rec["pairs_per_step"] = b
            out["train"] = train_figures(rec, step_tokens, n_params, 6 if pre else 8, peak)
            out["peak_gpu_mem_mb"] = {"train": rec["result"]["peak_gpu_mem_mb"]}
            if pre:
                pass_s = rec["result"]["precompute_s"] + rec["result"]["hash_s"]
                out["precompute"] = precompute_figures(pass_s, sum(pair_tokens), sum(pair_tokens),
                                                       n_params, peak)
            out["pipeline_wall_s"] = rec["wall_s"]
        else:
            shared = name.startswith("dpocli-pkps")
            extra = ["--packing", "--prefix-sharing"] if shared else ["--layout", "padded"]
            with attention_kernel("flex" if name.endswith("-flex") else None):
                pre = dpocli_precompute(f"{name}-precompute", run_args, model, data, workdir, None,
                                        extra=extra)
                rec = dpocli_train(f"{name}-train", run_args, model, pre["cache"], workdir,
                                   extra=extra)
            shutil.rmtree(pre["cache"], ignore_errors=True)
            rec["pairs_per_step"] = b
            if shared:  # the logged num_tokens is TRL's count; this layout runs each prompt once
                prompts = [sum(p[i:i + b]) for i in range(0, len(p), b)]  # sequential batches
                rec["step_tokens"] = [t - prompts[k % len(prompts)] for k, t in enumerate(rec["step_tokens"])]
            out["train"] = train_figures(rec, step_tokens, n_params, 6, peak)
            out["attention_kernel"] = rec["summary"].get("attention_kernel")
            out["peak_gpu_mem_mb"] = {"train": rec["timings"].get("peak_gpu_mem_mb"),
                                      "precompute": pre["timings"].get("peak_gpu_mem_mb")}
            out["precompute"] = precompute_figures(
                pre["timings"]["score_s"], sum(pair_tokens),
                shared_tokens if shared else sum(pair_tokens), n_params, peak)
            out["pipeline_wall_s"] = pre["wall_s"] + rec["wall_s"]
            out["step0_max_abs_diff"] = rec["summary"].get("step0_max_abs_diff")
        res["rows"][name] = out
    return res


def report(res: dict) -> str:
    s, d = res["settings"], res["data"]
    lines = [f"### GPU benchmark ({res['profile']}): {res['gpu'] or 'no GPU (CPU smoke run)'}, "
             f"{s['dtype']}, dense bf16 peak {fmt(res['peak_bf16_tflops'], 0)} TFLOP/s\n",
             f"Model: random-init Qwen2, {res['n_params']:,} parameters. Data: {d['pairs']} pairs, "
             f"prompt tokens mean {d['prompt_tokens'][1]:.0f}, chosen {d['chosen_tokens'][1]:.0f}, "
             f"rejected {d['rejected_tokens'][1]:.0f}; batch {s['batch_size']} pairs, 1 epoch.\n",
             "| row | train pairs/s | train tokens/s | train MFU | peak GPU MB (train / precompute) "
             "| precompute s | precompute tokens/s | precompute MFU | pipeline wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for row in res["rows"].values():
        t, pre, mem = row["train"], row.get("precompute") or {}, row["peak_gpu_mem_mb"]
        lines.append(f"| {row['label']} | {fmt(t['pairs_per_s'], 2)} | {fmt(t['tokens_per_s'], 0)} | "
                     f"{pct(t['mfu'])} | {fmt(mem.get('train'), 0)} / {fmt(mem.get('precompute'), 0)} | "
                     f"{fmt(pre.get('seconds'), 2)} | {fmt(pre.get('tokens_per_s'), 0)} | "
                     f"{pct(pre.get('mfu'))} | {fmt(row['pipeline_wall_s'], 1)} |")
    lines.append("\nTokens/s count the dataset's tokens (prompt twice per pair) for every row; MFU "
                 "counts the tokens each row ran (bench/gpu_bench.py documents both).")
    return "\n".join(lines) + "\n"


def default_trl_python() -> str:
    """This python when it has trl (the GPU machine, installed from bench/wheelhouse), else the
    CPU benchmark's venv."""
    probe = subprocess.run([sys.executable, "-c", "import trl"], capture_output=True)
    return sys.executable if probe.returncode == 0 else "/work/benchenv/bin/python"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    ap.add_argument("--rows", default="trl-default,trl-precompute,dpocli,dpocli-pkps",
                    help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--flex", action="store_true", help="add the dpocli-pkps-flex row (CUDA only)")
    ap.add_argument("--out-dir", type=Path, default=BENCH / "results")
    ap.add_argument("--trl-python", default=None, help="python with trl (default: see code)")
    args = ap.parse_args()
    profile = PROFILES[args.profile]
    rows = [r for r in args.rows.split(",") if r]
    if args.flex:
        rows.append("dpocli-pkps-flex")
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows: {sorted(unknown)}")
    if "dpocli-pkps-flex" in rows and profile["device"] != "cuda":
        raise SystemExit("the flex row trains, and FlexAttention has no CPU backward: CUDA only")
    args.trl_python = args.trl_python or default_trl_python()
    workdir = BENCH / "runs" / f"gpu-{args.profile}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    res = run_rows(args, profile, rows, workdir)
    stem = "gpu" if args.profile == "gpu" else f"gpu-{args.profile}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    text = report(res)
    (args.out_dir / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
