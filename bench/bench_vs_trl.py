"""dpocli vs TRL 1.16 DPOTrainer, side by side on one machine (CPU, fp32).

    python bench/bench_vs_trl.py --model-size tiny   --steps 4          # smoke test (~2 min)
    python bench/bench_vs_trl.py --model-size medium --epochs 3         # the real run

Every measurement runs in its own child process (under `nice -n 10`); the parent reads the child's
peak RSS and CPU time from os.wait4 (ru_maxrss of exactly that process). TRL runs with the
benchmark venv's python (--trl-python, default /work/benchenv/bin/python, see
bench/requirements.txt); dpocli runs with this python through its own entry point
(`dpocli.cli.app:main`, wrapped by bench/dpocli_timed.py only to time the scoring pass).

Runs (all on the same model, data, batch size, max length, lr, beta, seed, steps):
  dpocli-precompute      dpo precompute-ref --batch-size B       (reference pass, timed)
  dpocli-precompute-def  dpo precompute-ref (default --max-tokens 16384 batching)
  dpocli-train           dpo train --no-shuffle                  (sequential batches)
  dpocli-train-gbl       dpo train --group-by-length             (shuffled, length-grouped)
  dpocli-precompute-ps   dpo precompute-ref --batch-size B --prefix-sharing (prompt run once per pair)
  dpocli-train-ps        dpo train --no-shuffle --prefix-sharing, from the --prefix-sharing cache
  dpocli-precompute-pk   dpo precompute-ref --batch-size B --packing --prefix-sharing (padding-free)
  dpocli-train-pk        dpo train --no-shuffle --packing (padding-free), from the dpocli-precompute cache
  dpocli-train-pkps      dpo train --no-shuffle --packing --prefix-sharing, from the -pk cache
  trl-default            DPOTrainer, reference model in memory   (sequential batches)
  trl-precompute         DPOTrainer, precompute_ref_log_probs=True (sequential batches;
                         its _precompute_ref_logps pass is timed inside the same run)

Definitions
  training throughput  over steps 2..N (step 1 is the warm-up): pairs / s and non-pad tokens / s,
                       where non-pad tokens = prompt+chosen plus prompt+rejected per pair (the
                       attention-mask sum, TRL's `num_tokens`); seconds = wall time between the end
                       of step 1 and the end of step N (logging and data loading included).
  precompute throughput  completion tokens / s (chosen+rejected completion tokens incl. EOS, the
                       tokens that are scored) and non-pad tokens / s, over the scoring pass only
                       (dpocli: _score_shard; TRL: _precompute_ref_logps + its weight hash).
                       End-to-end process wall time is reported as well.
  wall time            launch of the process(es) to the end of the last step of epoch k
                       (dpocli: precompute process wall + train launch..step); the "process" column
                       is launch to exit, final model saving included (dpocli also writes a
                       checkpoint with optimizer state; TRL runs trainer.save_model()).
Results: bench/runs/<size>/ (logs, raw.json, report.md; gitignored) and the committed copies
bench/results/<size>.md (tables, also printed) and bench/results/<size>.json (raw numbers).
Runs named in --only are redone; the others are kept from bench/runs/<size>/raw.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402

BENCH = assets.BENCH
REPO = assets.REPO
RUN_ORDER = ["dpocli-precompute", "trl-precompute", "dpocli-train", "trl-default",
             "dpocli-train-gbl", "dpocli-precompute-def", "dpocli-precompute-ps", "dpocli-train-ps",
             "dpocli-precompute-pk", "dpocli-train-pk", "dpocli-train-pkps"]
TRAJ_KEYS = ["loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
             "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"]


# --------------------------------------------------------------------------------------------
# Running children


WAIT_QUIET = {"max_s": 0.0, "busy": 0.25}
NICE = ["nice", "-n", "10"]  # every child's prefix; bench_default_layout.py clears it on a busy VM


def cpu_jiffies() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz


def wait_quiet() -> float:
    """Wait (up to WAIT_QUIET['max_s']) until the other processes use < WAIT_QUIET['busy'] of the
    CPUs over a 3 s window, so a measurement does not start in the middle of someone else's job."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < WAIT_QUIET["max_s"]:
        b0, a0 = cpu_jiffies()
        time.sleep(3)
        b1, a1 = cpu_jiffies()
        if (b1 - b0) / max(a1 - a0, 1e-9) < WAIT_QUIET["busy"]:
            break
    return time.perf_counter() - t0


def run_child(name: str, cmd: list[str], workdir: Path, env: dict | None = None) -> dict:
    """Run `cmd` under nice in its own process; return wall, CPU and peak RSS of that process, and
    the share of the machine's CPU the *other* processes used meanwhile (contention)."""
    out_path, err_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    full = [*NICE, *cmd]
    waited = wait_quiet()
    print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
    load_before = os.getloadavg()
    busy0, _ = cpu_jiffies()
    t = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(full, stdout=out, stderr=err, cwd=REPO,
                                env={**os.environ, **(env or {})})
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    busy1, _ = cpu_jiffies()
    cpu = ru.ru_utime + ru.ru_stime
    others = max(0.0, busy1 - busy0 - cpu) / (wall * (os.cpu_count() or 1))
    rec = {"name": name, "cmd": cmd, "rc": proc.returncode, "wall_s": wall,
           "cpu_s": cpu, "peak_rss_mb": ru.ru_maxrss / 1024, "others_cpu_share": others,
           "waited_quiet_s": waited,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    print(f"[bench] {name}: rc={proc.returncode} wall={wall:.1f}s cpu={cpu:.1f}s "
          f"rss={rec['peak_rss_mb']:.0f}MB others={others:.0%} waited={waited:.0f}s "
          f"load={load_before[0]:.2f}->{rec['loadavg_after'][0]:.2f}", flush=True)
    if proc.returncode != 0:
        sys.stderr.write(err_path.read_text()[-4000:])
        raise SystemExit(f"{name} failed (rc {proc.returncode}); see {err_path}")
    return rec


def dpocli_precompute(name, args, model, data, workdir, batch_size, extra=()) -> dict:
    cache_dir = workdir / name
    timings = workdir / f"{name}.timings.json"
    cmd = [sys.executable, str(BENCH / "dpocli_timed.py"), "precompute-ref", str(data),
           "--model", str(model), "--out", str(cache_dir), "--max-length", str(args.max_length),
           "--device", args.device, "--dtype", args.dtype, "--json", "-q", "--overwrite"]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    cmd += list(extra)
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    rec = run_child(name, cmd, workdir, {"BENCH_TIMINGS": str(timings)})
    rec["summary"] = json.loads((workdir / f"{name}.stdout").read_text())
    rec["timings"] = json.loads(timings.read_text())
    rec["cache"] = str(cache_dir)
    return rec


def dpocli_train(name, args, model, cache_dir, workdir, group_by_length=False, epochs=None,
                 extra=()) -> dict:
    run_dir = workdir / name
    timings = workdir / f"{name}.timings.json"
    cmd = [sys.executable, str(BENCH / "dpocli_timed.py"), "train", str(cache_dir),
           "--model", str(model), "--out", str(run_dir),
           "--beta", str(args.beta), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
           "--scheduler", "linear", "--warmup-steps", "0", "--weight-decay", "0",
           "--max-grad-norm", "1.0", "--seed", str(args.seed), "--device", args.device,
           "--dtype", args.dtype, "--json", "-q", "--overwrite"]
    cmd += ["--group-by-length"] if group_by_length else ["--no-shuffle"]
    cmd += ["--max-steps", str(args.steps)] if args.steps and not epochs else \
        ["--epochs", str(epochs or args.epochs)]
    cmd += list(extra)
    rec = run_child(name, cmd, workdir, {"BENCH_TIMINGS": str(timings)})
    summary = json.loads((workdir / f"{name}.stdout").read_text())
    tm = json.loads(timings.read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert len(steps) == len(tm["step_end_s"]), "one timing per step"
    rec.update(summary=summary, timings={k: v for k, v in tm.items() if not k.startswith("step_")},
               steps=steps, step_end_s=tm["step_end_s"], step_cpu_s=tm["step_cpu_s"],
               step_tokens=_diffs([s["num_tokens"] for s in steps]), end_train_s=tm["step_end_s"][-1])
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are large and not needed
    return rec


def trl_run(name, args, model, data, workdir, precompute: bool) -> dict:
    result = workdir / f"{name}.result.json"
    cmd = [args.trl_python, str(BENCH / "trl_worker.py"), "--model", str(model), "--data", str(data),
           "--out", str(workdir / name), "--result", str(result),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--lr", str(args.lr), "--beta", str(args.beta), "--seed", str(args.seed),
           "--optim", args.trl_optim, "--device", args.device, "--dtype", args.dtype]
    cmd += ["--max-steps", str(args.steps)] if args.steps else ["--epochs", str(args.epochs)]
    if precompute:
        cmd += ["--precompute", "--precompute-batch-size", str(args.batch_size)]
    if args.trl_steps:
        cmd += ["--stop-after", str(args.trl_steps)]
    rec = run_child(name, cmd, workdir)
    res = json.loads(result.read_text())
    steps = res.pop("steps")
    rec.update(result=res, steps=steps, step_end_s=res["step_end_s"], step_cpu_s=res["step_cpu_s"],
               step_tokens=_diffs([int(s["num_tokens"]) for s in steps]),
               end_train_s=res["end_train_s"])
    shutil.rmtree(workdir / name, ignore_errors=True)
    return rec


def _diffs(cum: list[int]) -> list[int]:
    return [c - p for c, p in zip(cum, [0] + cum[:-1])]


# --------------------------------------------------------------------------------------------
# Environment


def machine_info(trl_python: str) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    probe = ("import sys,torch,transformers,trl,accelerate,datasets;"
             "print(sys.version.split()[0],torch.__version__,transformers.__version__,trl.__version__,"
             "accelerate.__version__,datasets.__version__,torch.get_num_threads())")
    out = subprocess.run([trl_python, "-c", probe], capture_output=True, text=True).stdout.split()
    import dpocli
    keys = ["python", "torch", "transformers", "trl", "accelerate", "datasets", "torch_threads"]
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": mem_gb, "platform": platform.platform(),
            "gpu": "none (not measured)", "dpocli": dpocli.__version__,
            **dict(zip(keys, out))}


# --------------------------------------------------------------------------------------------
# Report


def steady(rec: dict, skip: int = 1) -> dict:
    """Throughput over steps skip+1..N from step end times."""
    ends, toks = rec["step_end_s"], rec["step_tokens"]
    n = len(ends)
    if n <= skip:
        return {"steps": 0}
    secs = ends[-1] - ends[skip - 1]
    pairs = rec["pairs_per_step"] * (n - skip)
    tokens = sum(toks[skip:])
    cpus = rec.get("step_cpu_s")
    cpu_per_step = (cpus[-1] - cpus[skip - 1]) / (n - skip) if cpus else None
    per = sorted(b - a for a, b in zip(ends[skip - 1:-1], ends[skip:]))
    median = per[len(per) // 2] if len(per) % 2 else (per[len(per) // 2 - 1] + per[len(per) // 2]) / 2
    return {"steps": n - skip, "s_per_step": secs / (n - skip), "median_s_per_step": median,
            "cpu_s_per_step": cpu_per_step,
            "pairs_per_s": pairs / secs, "tokens_per_s": tokens / secs, "step1_s": ends[0]}


def epoch_time(rec: dict, k: int, spe: int, pre_s: float = 0.0) -> tuple[float, bool]:
    """Launch -> end of epoch k (+ precompute), measured if the run got there, else extrapolated
    from the end of step 1 plus steady s/step."""
    ends = rec["step_end_s"]
    target = k * spe
    if len(ends) >= target:
        return pre_s + ends[target - 1], True
    st = steady(rec)
    return pre_s + ends[0] + (target - 1) * st["s_per_step"], False


def fmt(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and abs(x) < 10 ** -nd:
            return f"{x:.2e}"
        return f"{x:,.{nd}f}"
    return str(x)


def report(res: dict) -> str:
    a, runs = res["args"], res["runs"]
    spe = res["steps_per_epoch"]
    lines = []
    w = lines.append
    w(f"### {a['model_size']} model — {res['data']['pairs']} pairs, batch {a['batch_size']}, "
      f"max_length {a['max_length']}, lr {a['lr']}, β {a['beta']}, seed {a['seed']}, "
      f"{spe} steps/epoch, {len(runs['dpocli-train']['steps'])} steps per training run\n")
    d = res["data"]
    w(f"Data: prompt tokens min/mean/max {d['prompt_tokens'][0]}/{d['prompt_tokens'][1]:.0f}/"
      f"{d['prompt_tokens'][2]}, chosen {d['chosen_tokens'][0]}/{d['chosen_tokens'][1]:.0f}/"
      f"{d['chosen_tokens'][2]}, rejected {d['rejected_tokens'][0]}/{d['rejected_tokens'][1]:.0f}/"
      f"{d['rejected_tokens'][2]}; {d['completion_tokens_total']:,} completion tokens, "
      f"{d['nonpad_tokens_total']:,} non-pad tokens per epoch.\n")

    # Precompute
    ct, nt = d["completion_tokens_total"], d["nonpad_tokens_total"]
    pre_rows, others = [], {}
    trl_pre = runs.get("trl-precompute")
    trl_pass = None
    if trl_pre:
        r = trl_pre["result"]
        trl_pass = r["precompute_s"] + r["hash_s"]
        label = "TRL `_precompute_ref_logps` (batch %d) + weight hash" % a["batch_size"]
        pre_rows.append((label, trl_pass, None, None))
        others[label] = trl_pre.get("others_cpu_share", 0)
    for key, label in (("dpocli-precompute", f"dpocli `precompute-ref --batch-size {a['batch_size']}`"),
                       ("dpocli-precompute-def", "dpocli `precompute-ref` (default --max-tokens 16384)"),
                       ("dpocli-precompute-ps", f"dpocli `precompute-ref --batch-size {a['batch_size']} --prefix-sharing`"),
                       ("dpocli-precompute-pk", f"dpocli `precompute-ref --batch-size {a['batch_size']} --packing --prefix-sharing`")):
        if key in runs:
            r = runs[key]
            pre_rows.append((label, r["timings"]["score_s"], r["wall_s"], r["peak_rss_mb"]))
            others[label] = r.get("others_cpu_share", 0)
    w("**Reference precompute** (scoring pass only; dpocli also end to end)\n")
    w("| run | pass s | completion tok/s | non-pad tok/s | speed-up vs TRL pass | dpocli process wall s | end-to-end completion tok/s | peak RSS MB | others' CPU share (whole run) |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, s, wall, rss in pre_rows:
        ratio = (trl_pass / s) if trl_pass else None
        w(f"| {label} | {fmt(s, 2)} | {fmt(ct / s, 0)} | {fmt(nt / s, 0)} | "
          f"{fmt(ratio, 2) + '×' if ratio else '–'} | {fmt(wall, 1)} | "
          f"{fmt(ct / wall, 0) if wall else '–'} | {fmt(rss, 0)} | {others[label]:.0%} |")
    if trl_pre:
        r = trl_pre["result"]
        w(f"\nTRL pass = {r['precompute_s']:.2f} s in `_precompute_ref_logps` + {r['hash_s']:.3f} s "
          f"in `hash_module`; TRL's DPOTrainer construction with precompute took {r['construct_s']:.1f} s "
          f"vs {runs['trl-default']['result']['construct_s']:.1f} s without (the latter loads the "
          f"reference model instead).\n" if "trl-default" in runs else "\n")

    # Training
    base = steady(runs["trl-default"]) if "trl-default" in runs else None
    base_rss = runs["trl-default"]["peak_rss_mb"] if "trl-default" in runs else None
    w("**Training** (steps 2..N, fp32 CPU; ratios vs TRL default)\n")
    w("| run | steps timed | wall s/step (median) | pairs/s | non-pad tok/s | throughput × TRL default | "
      "CPU s/step | × TRL default, CPU-time basis | peak RSS MB | RSS × TRL default | process wall s | "
      "others' CPU share |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    labels = {"trl-default": "TRL default (reference model in memory)",
              "trl-precompute": "TRL precompute_ref_log_probs=True",
              "dpocli-train": "dpocli `train --no-shuffle`",
              "dpocli-train-gbl": "dpocli `train --group-by-length` (shuffled)",
              "dpocli-train-ps": "dpocli `train --no-shuffle --prefix-sharing`",
              "dpocli-train-pk": "dpocli `train --no-shuffle --packing`",
              "dpocli-train-pkps": "dpocli `train --no-shuffle --packing --prefix-sharing`"}
    for key in labels:
        if key not in runs:
            continue
        r, st = runs[key], steady(runs[key])
        ratio = st["pairs_per_s"] / base["pairs_per_s"] if base else None
        rss_ratio = r["peak_rss_mb"] / base_rss if base_rss else None
        cpu_ratio = base["cpu_s_per_step"] / st["cpu_s_per_step"] if base and st["cpu_s_per_step"] else None
        w(f"| {labels[key]} | {st['steps']} | {fmt(st['s_per_step'], 2)} ({fmt(st['median_s_per_step'], 2)}) | "
          f"{fmt(st['pairs_per_s'], 2)} | "
          f"{fmt(st['tokens_per_s'], 0)} | {fmt(ratio, 2)}× | {fmt(st['cpu_s_per_step'], 2)} | "
          f"{fmt(cpu_ratio, 2)}× | {fmt(r['peak_rss_mb'], 0)} | "
          f"{fmt(rss_ratio, 2)}× | {fmt(r['wall_s'], 0)} | "
          f"{r.get('others_cpu_share', 0):.0%} |")
    if any(k in runs for k in ("dpocli-train-gbl", "dpocli-train-ps", "dpocli-train-pk")):
        w("\n(non-pad tok/s counts real tokens only: --group-by-length and --packing feed the same real "
          "tokens with less or no padding, and --prefix-sharing feeds each prompt once, so compare "
          "those rows by pairs/s.)\n")

    # Wall time
    w("**Wall time** (launch to end of the last step of the epoch; `process` = launch to exit incl. saving)\n")
    w("| pipeline | precompute + 1 epoch s | × TRL default | precompute + 3 epochs s | × TRL default | "
      "process wall of the training run(s) s |")
    w("|---|---:|---:|---:|---:|---:|")
    rows = []
    if "trl-default" in runs:
        rows.append(("TRL default", runs["trl-default"], 0.0, runs["trl-default"]["wall_s"]))
    if "trl-precompute" in runs:
        rows.append(("TRL precompute (pass inside the run)", runs["trl-precompute"], 0.0,
                     runs["trl-precompute"]["wall_s"]))
    # (label, precompute run, training run): the pipeline's time adds the precompute process wall
    pipelines = (("dpocli precompute-ref + train", "dpocli-precompute", "dpocli-train"),
                 ("dpocli precompute-ref + train --group-by-length", "dpocli-precompute", "dpocli-train-gbl"),
                 ("dpocli precompute-ref + train, both --prefix-sharing", "dpocli-precompute-ps",
                  "dpocli-train-ps"),
                 ("dpocli precompute-ref + train, both --packing --prefix-sharing", "dpocli-precompute-pk",
                  "dpocli-train-pkps"))
    for label, pre, train in pipelines:
        if pre in runs and train in runs:
            p = runs[pre]["wall_s"]
            rows.append((label, runs[train], p, p + runs[train]["wall_s"]))
    ref1 = epoch_time(runs["trl-default"], 1, spe)[0] if "trl-default" in runs else None
    ref3 = epoch_time(runs["trl-default"], 3, spe)[0] if "trl-default" in runs else None
    extrapolated = False
    for label, r, pre, proc_wall in rows:
        e1, m1 = epoch_time(r, 1, spe, pre)
        e3, m3 = epoch_time(r, 3, spe, pre)
        extrapolated |= not (m1 and m3)
        w(f"| {label} | {fmt(e1, 1)}{'' if m1 else '*'} | {fmt(e1 / ref1, 2)}× | {fmt(e3, 1)}"
          f"{'' if m3 else '*'} | {fmt(e3 / ref3, 2)}× | {fmt(proc_wall, 1)} |")
    if extrapolated:
        w("\n\\* extrapolated: launch to end of step 1 plus (epochs·steps_per_epoch − 1) × steady s/step.\n")

    # Trajectories
    n_cmp = min(len(runs[k]["steps"]) for k in ("dpocli-train", "trl-default", "trl-precompute") if k in runs)
    w(f"\n**Trajectories** (sequential batches, same lr schedule; max |difference| over steps 1..{n_cmp})\n")
    w("| metric | dpocli vs TRL default | dpocli vs TRL precompute | TRL default vs TRL precompute | "
      "dpocli --prefix-sharing vs TRL default | dpocli --packing --prefix-sharing vs TRL default |")
    w("|---|---:|---:|---:|---:|---:|")
    traj = res["trajectory_diff"]
    for key in TRAJ_KEYS:
        cells = [traj.get(pair, {}).get(key) for pair in ("dpocli~trl-default", "dpocli~trl-precompute",
                                                          "trl-default~trl-precompute", "dpocli-ps~trl-default",
                                                          "dpocli-pkps~trl-default")]
        w(f"| {key} | " + " | ".join(fmt(c[0], 3) + (f" (step {c[1]})" if c and c[0] else "")
                                     if c else "–" for c in cells) + " |")
    w("\nPer step (dpocli / TRL default):\n")
    w("| step | loss | rewards/margins | rewards/accuracies | grad_norm |")
    w("|---:|---|---|---|---|")
    ds, ts = runs["dpocli-train"]["steps"], runs.get("trl-default", {}).get("steps", [])
    for i, s in enumerate(ds[:n_cmp]):
        t = ts[i] if i < len(ts) else {}
        w(f"| {i + 1} | {s['loss']:.6f} / {t.get('loss', float('nan')):.6f} | "
          f"{s['rewards/margins']:.6f} / {t.get('rewards/margins', float('nan')):.6f} | "
          f"{s['rewards/accuracies']:.3f} / {t.get('rewards/accuracies', float('nan')):.3f} | "
          f"{s['grad_norm']:.4f} / {t.get('grad_norm', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"


def trajectory_diff(runs: dict) -> dict:
    out = {}
    names = {"dpocli-train": "dpocli", "dpocli-train-ps": "dpocli-ps", "dpocli-train-pkps": "dpocli-pkps"}
    for a, b in (("dpocli-train", "trl-default"), ("dpocli-train", "trl-precompute"),
                 ("trl-default", "trl-precompute"), ("dpocli-train-ps", "trl-default"),
                 ("dpocli-train-pkps", "trl-default")):
        if a not in runs or b not in runs:
            continue
        sa, sb = runs[a]["steps"], runs[b]["steps"]
        pair = f"{names.get(a, a)}~{b}"
        out[pair] = {}
        for key in TRAJ_KEYS:
            diffs = [abs(float(x[key]) - float(y[key])) for x, y in zip(sa, sb) if key in x and key in y]
            if diffs:
                i = max(range(len(diffs)), key=diffs.__getitem__)
                out[pair][key] = [diffs[i], i + 1]
    return out


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", choices=["tiny", "medium"], required=True)
    ap.add_argument("--pairs", type=int, default=96, help="synthetic pairs (default 96)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per training run (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="max steps per training run instead of --epochs")
    ap.add_argument("--trl-steps", type=int, default=None,
                    help="stop the TRL runs after this many steps (their lr schedule still spans the "
                         "full --epochs, like dpocli's); epoch wall times are then extrapolated")
    ap.add_argument("--gbl-epochs", type=int, default=1, help="epochs of the --group-by-length row")
    ap.add_argument("--only", default=",".join(RUN_ORDER), help="comma-separated runs to (re)do")
    ap.add_argument("--report-only", action="store_true", help="re-render from saved raw results")
    ap.add_argument("--trl-python", default="/work/benchenv/bin/python")
    ap.add_argument("--wait-quiet", type=float, default=120.0,
                    help="before each run, wait up to this many seconds for other processes to go "
                         "below 25%% CPU (0: never wait)")
    ap.add_argument("--trl-optim", default="adamw_torch",
                    help="TRL optim: adamw_torch = the same torch AdamW (foreach) dpocli uses on CPU; "
                         "HF's default would be adamw_torch_fused")
    args = ap.parse_args()
    args.device, args.dtype = "cpu", "float32"  # this CPU benchmark; bench/gpu_bench.py sets others

    if args.pairs % args.batch_size:
        raise SystemExit("--pairs must be a multiple of --batch-size (every step has the same pairs)")
    WAIT_QUIET["max_s"] = args.wait_quiet
    workdir = BENCH / "runs" / args.model_size
    workdir.mkdir(parents=True, exist_ok=True)
    raw_path = workdir / "raw.json"
    res = json.loads(raw_path.read_text()) if raw_path.exists() else {"runs": {}}
    if not args.report_only:
        model = assets.build_medium_model() if args.model_size == "medium" else assets.snapshot_tiny()
        if not (Path(model) / "config.json").exists():
            raise SystemExit(f"model not found: {model}")
        data = assets.build_data(args.pairs)
        res.update(args=vars(args), machine=machine_info(args.trl_python), model=str(model),
                   data_file=str(data), data=assets.token_stats(data),
                   steps_per_epoch=math.ceil(args.pairs / args.batch_size))
        runs = res["runs"]
        wanted = [r for r in RUN_ORDER if r in args.only.split(",")]
        for name in wanted:
            if name == "dpocli-precompute":
                runs[name] = dpocli_precompute(name, args, model, data, workdir, args.batch_size)
            elif name == "dpocli-precompute-def":
                runs[name] = dpocli_precompute(name, args, model, data, workdir, None)
                shutil.rmtree(runs[name]["cache"], ignore_errors=True)
            elif name == "dpocli-train":
                runs[name] = dpocli_train(name, args, model, runs["dpocli-precompute"]["cache"], workdir)
            elif name == "dpocli-train-gbl":
                runs[name] = dpocli_train(name, args, model, runs["dpocli-precompute"]["cache"], workdir,
                                          group_by_length=True, epochs=args.gbl_epochs if not args.steps else None)
            elif name == "dpocli-precompute-ps":
                runs[name] = dpocli_precompute(name, args, model, data, workdir, args.batch_size,
                                               extra=["--prefix-sharing"])
            elif name == "dpocli-train-ps":
                runs[name] = dpocli_train(name, args, model, runs["dpocli-precompute-ps"]["cache"], workdir,
                                          extra=["--prefix-sharing"])
            elif name == "dpocli-precompute-pk":
                runs[name] = dpocli_precompute(name, args, model, data, workdir, args.batch_size,
                                               extra=["--packing", "--prefix-sharing"])
            elif name == "dpocli-train-pk":
                runs[name] = dpocli_train(name, args, model, runs["dpocli-precompute"]["cache"], workdir,
                                          extra=["--packing"])
            elif name == "dpocli-train-pkps":
                runs[name] = dpocli_train(name, args, model, runs["dpocli-precompute-pk"]["cache"], workdir,
                                          extra=["--packing", "--prefix-sharing"])
            elif name in ("trl-default", "trl-precompute"):
                runs[name] = trl_run(name, args, model, data, workdir, precompute=name == "trl-precompute")
            for r in runs.values():
                r["pairs_per_step"] = args.batch_size
            raw_path.write_text(json.dumps(res, indent=1, default=str))
    res["trajectory_diff"] = trajectory_diff(res["runs"])
    raw_path.write_text(json.dumps(res, indent=1, default=str))
    text = report(res)
    (workdir / "report.md").write_text(text)
    # The committed copies (bench/runs/ is gitignored): tables and the raw numbers behind them.
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    (results / f"{args.model_size}.md").write_text(text)
    shutil.copy(raw_path, results / f"{args.model_size}.json")
    print(text)


if __name__ == "__main__":
    main()
