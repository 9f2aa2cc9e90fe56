"""Issue 25: dpocli at default flags (`--layout auto`) against TRL 1.16, side by side in one run, on
the ~60M Llama (bench/assets.py LARGE_CONFIG: 57.7M parameters, vocab 32768), batch 8, fp32 CPU.

    python bench/bench_default_layout.py --trl-python /path/to/venv/bin/python [--steps 4]

Rows, run one after another in this order (interleaved, so that both tools see the same machine
load), each in its own process (bench_vs_trl.run_child: wall, CPU, ru_maxrss of that process):
  dpocli-precompute         dpo precompute-ref at default flags (layout auto, --max-tokens 16384)
  trl-default               DPOTrainer, reference model in memory
  dpocli-train              dpo train at default flags (layout auto) from that cache
  trl-precompute            DPOTrainer, precompute_ref_log_probs=True
  dpocli-train-padded       dpo train --layout padded (the pre-issue default) from the same cache
  and on short rows (prompt 8-24, completions 20-60 tokens), dpocli only:
  dpocli-precompute-short, dpocli-train-short (auto), dpocli-train-short-padded.
dpocli trains --steps steps, TRL stops after --trl-steps of the same --steps schedule. Throughput
is over the steps after the first (bench_vs_trl.steady). Writes bench/results/default-layout.json
and .md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402
import bench_vs_trl as bvt  # noqa: E402

SHORT = {"prompt_tokens": (8, 24), "completion_tokens": (20, 60)}
KEYS = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
        "grad_norm")


def rel_diff(a: list[dict], b: list[dict]) -> dict:
    """Largest |a - b| / max(|b|, 1e-8) per key over the common steps."""
    out = {}
    for key in KEYS:
        d = [abs(float(x[key]) - float(y[key])) / max(abs(float(y[key])), 1e-8)
             for x, y in zip(a, b) if key in x and key in y]
        if d:
            out[key] = max(d)
    return out


def table(res: dict) -> str:
    runs = res["runs"]
    base = runs.get("trl-default")  # absent when --only left TRL out: no ratios then
    b_st = bvt.steady(base) if base else None
    lines = ["| row | wall s/step (CPU s/step) | pairs/s | × TRL default | × TRL precompute | peak RSS MB | × TRL default RSS |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    pre = bvt.steady(runs["trl-precompute"]) if "trl-precompute" in runs else None
    for name, r in runs.items():
        if "steps" not in r:
            lines.append(f"| {name} | – | – | – | – | {r['peak_rss_mb']:,.0f} | – |")
            continue
        st = bvt.steady(r)
        vs_pre = f"{st['pairs_per_s'] / pre['pairs_per_s']:.2f}×" if pre else "–"
        vs_base = f"{st['pairs_per_s'] / b_st['pairs_per_s']:.2f}×" if base else "–"
        rss = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}×" if base and "short" not in name else "–"
        cpu = f" (CPU {st['cpu_s_per_step']:.1f} s)" if st.get("cpu_s_per_step") else ""
        lines.append(f"| {name} | {st['s_per_step']:.2f}{cpu} | {st['pairs_per_s']:.3f} | {vs_base} | "
                     f"{vs_pre} | {r['peak_rss_mb']:,.0f} | {rss} |")
    lines.append("")
    for a, b in (("dpocli-train", "trl-default"), ("dpocli-train-padded", "trl-default"),
                 ("dpocli-train", "dpocli-train-padded"), ("dpocli-train-short", "dpocli-train-short-padded")):
        if a in runs and b in runs:
            d = rel_diff(runs[a]["steps"], runs[b]["steps"])
            lines.append(f"- max relative difference {a} vs {b}: " +
                         ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl-python", default="/work/benchenv/bin/python")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--trl-steps", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated rows (default: all)")
    args = ap.parse_args()
    # bench_vs_trl's helpers read these (its defaults; the same for both tools)
    args.batch_size, args.max_length, args.lr, args.beta, args.seed = 8, 512, 1e-5, 0.1, 42
    args.device, args.dtype, args.epochs, args.trl_optim = "cpu", "float32", 1, "adamw_torch"
    bvt.WAIT_QUIET["max_s"] = 0.0  # the VM is never quiet; rows are interleaved instead
    bvt.NICE.clear()  # under `nice` the children starve behind the other users' jobs
    workdir = assets.BENCH / "runs" / "default-layout"
    workdir.mkdir(parents=True, exist_ok=True)
    model = assets.build_large_model()
    data = assets.build_data(args.pairs)
    short = assets.build_data(args.pairs, **SHORT)
    res = {"args": vars(args), "machine": bvt.machine_info(args.trl_python), "model": str(model),
           "data": assets.token_stats(data), "data_short": assets.token_stats(short), "runs": {}}
    runs = res["runs"]
    wanted = args.only.split(",") if args.only else None

    def row(name, make):
        if wanted is None or name in wanted:
            runs[name] = make()
            runs[name]["pairs_per_step"] = args.batch_size
            (workdir / "raw.json").write_text(json.dumps(res, indent=1, default=str))

    trl_args = argparse.Namespace(**{**vars(args), "steps": args.steps, "trl_steps": args.trl_steps})
    row("dpocli-precompute", lambda: bvt.dpocli_precompute("dpocli-precompute", args, model, data, workdir, None))
    cache = workdir / "dpocli-precompute"
    row("trl-default", lambda: bvt.trl_run("trl-default", trl_args, model, data, workdir, False))
    row("dpocli-train", lambda: bvt.dpocli_train("dpocli-train", args, model, cache, workdir))
    row("trl-precompute", lambda: bvt.trl_run("trl-precompute", trl_args, model, data, workdir, True))
    row("dpocli-train-padded", lambda: bvt.dpocli_train("dpocli-train-padded", args, model, cache, workdir,
                                                        extra=["--layout", "padded"]))
    row("dpocli-precompute-short", lambda: bvt.dpocli_precompute("dpocli-precompute-short", args, model,
                                                                 short, workdir, None))
    short_cache = workdir / "dpocli-precompute-short"
    row("dpocli-train-short", lambda: bvt.dpocli_train("dpocli-train-short", args, model, short_cache, workdir))
    row("dpocli-train-short-padded", lambda: bvt.dpocli_train("dpocli-train-short-padded", args, model,
                                                              short_cache, workdir, extra=["--layout", "padded"]))
    text = table(res)
    out = assets.BENCH / "results"
    (out / "default-layout.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "default-layout.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
