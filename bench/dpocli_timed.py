"""Run the `dpo` CLI unchanged, but time it from outside.

    python bench/dpocli_timed.py precompute-ref DATA --model M --out CACHE ...
    python bench/dpocli_timed.py train CACHE --model M --out RUN ...

is exactly `dpo precompute-ref ...` / `dpo train ...` (same entry point, `dpocli.cli.app:main`), except:
* `dpocli.precompute.run._score_shard` (collate + reference forward + gather of the sums, per shard) is
  wrapped with a timer, so the pass can be compared with TRL's `_precompute_ref_logps` on equal
  terms (both without imports, tokenization, model loading and file writing);
* `dpocli.objective.metrics.MetricsLog.write` records, for every training-step record, the seconds since this
  process started and the process CPU time (user+sys), the same clocks bench/trl_worker.py reads
  in its on_step_end callback.
On exit it also records `peak_gpu_mem_mb` (torch.cuda.max_memory_allocated over the whole process)
when the command used CUDA. Everything goes to the JSON file named by $BENCH_TIMINGS.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    from dpocli.cli import app as cli
    from dpocli.objective import metrics
    from dpocli.precompute import run as precompute

    timings = {"score_s": 0.0, "score_calls": 0, "step_end_s": [], "step_cpu_s": []}
    real = precompute._score_shard

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            timings["score_s"] += time.perf_counter() - t
            timings["score_calls"] += 1

    precompute._score_shard = timed

    real_write = metrics.MetricsLog.write

    def write(self, record):
        if "loss" in record and not any(k.startswith("eval_") for k in record):
            timings["step_end_s"].append(time.perf_counter() - T0)
            timings["step_cpu_s"].append(_cpu())
        return real_write(self, record)

    metrics.MetricsLog.write = write
    timings["imports_s"] = time.perf_counter() - T0
    sys.argv = ["dpo", *sys.argv[1:]]
    try:
        cli.main()
    finally:
        timings["total_s"] = time.perf_counter() - T0
        timings["total_cpu_s"] = _cpu()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            timings["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        path = os.environ.get("BENCH_TIMINGS")
        if path:
            with open(path, "w") as f:
                json.dump(timings, f)


if __name__ == "__main__":
    main()
