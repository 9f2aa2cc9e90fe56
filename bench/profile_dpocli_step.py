"""Where does a `dpo train` step spend its time and memory? (diagnostic helper, not part of the
side-by-side numbers)

Replays dpocli's own training step (dpocli.model.logprobs.CompletionScorer + sequence_logps,
dpocli.objective.losses.compute_loss, dpocli.train.schedule.make_optimizer, clip 1.0) on the first batches of a
cache, in the same order as `dpo train --no-shuffle`, and times forward / backward / clip /
optimizer separately. Knobs that `dpo train` does not expose are varied here to size possible
levers: the LM-head chunk size (TrainConfig.chunk_size, fixed at 1024 by the CLI) and fused AdamW
on CPU (make_optimizer passes fused=None on CPU); the batch layouts (`prefix`, `packed`,
`packed_prefix`) are the ones `--prefix-sharing` and `--packing` select. Each variant runs in its own process so peak RSS
(ru_maxrss) is per variant.

    python bench/profile_dpocli_step.py --cache bench/runs/medium/dpocli-precompute \\
        --model bench/models/medium-llama --steps 5 --variants base,chunk256,chunk4096,fused
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = {
    "base": {},
    "chunk256": {"chunk_size": 256},
    "chunk4096": {"chunk_size": 4096},
    "fused": {"fused": True},
    "threads1": {"threads": 1},
    "prefix": {"prefix_sharing": True},
    "packed": {"packing": True},
    "packed_prefix": {"packing": True, "prefix_sharing": True},
}


def one(args, variant: dict) -> dict:
    import torch

    from dpocli.cache import store as cache
    from dpocli.model.load import load_causal_lm
    from dpocli.model.logprobs import CompletionScorer, sequence_logps
    from dpocli.objective.losses import LossInputs, compute_loss
    from dpocli.scoring.replay import cache_batch, cached_reference
    from dpocli.train.config import TrainConfig

    if variant.get("threads"):
        torch.set_num_threads(variant["threads"])
    manifest, data = cache.load_cache(args.cache)
    pad_id = int(manifest.spec["tokenizer"]["pad_token_id"])
    cfg = TrainConfig(cache=args.cache, model=args.model, out="/nonexistent", lr=1e-5,
                      chunk_size=variant.get("chunk_size", 1024))
    spec = cfg.loss_spec()
    torch.manual_seed(0)
    model = load_causal_lm(args.model, dtype="float32", device="cpu")
    model.train()
    scorer = CompletionScorer(model, chunk_size=cfg.chunk_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, fused=variant.get("fused"))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = {"collate": [], "forward": [], "backward": [], "clip": [], "optimizer": []}
    losses = []
    for step in range(args.steps):
        rows = list(range(step * args.batch_size, (step + 1) * args.batch_size))
        t0 = time.perf_counter()
        batch = cache_batch(data, rows, pad_id, variant.get("prefix_sharing", False),
                            variant.get("packing", False))
        ref = cached_reference(data, rows, "cpu")
        t1 = time.perf_counter()
        pol = sequence_logps(scorer, batch)
        out = compute_loss(LossInputs.from_logps(pol, ref), spec)
        t2 = time.perf_counter()
        out.loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        for k, a, b in (("collate", t0, t1), ("forward", t1, t2), ("backward", t2, t3), ("clip", t3, t4),
                        ("optimizer", t4, t5)):
            times[k].append(b - a)
        losses.append(float(out.loss))
    skip = 1 if args.steps > 1 else 0
    return {"variant": variant, "threads": torch.get_num_threads(),
            "mean_s_after_step1": {k: sum(v[skip:]) / len(v[skip:]) for k, v in times.items()},
            "step_s_after_step1": sum(sum(v[skip:]) for v in times.values()) / len(times["forward"][skip:]),
            "rss_after_load_mb": rss0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variants", default="base,chunk256,chunk4096,fused")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args, VARIANTS[args.child])))
        return
    results = []
    for name in args.variants.split(","):
        cmd = ["nice", "-n", "10", sys.executable, __file__, "--cache", args.cache, "--model", args.model,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--child", name]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"variant {name} failed")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res["name"] = name
        results.append(res)
        m = res["mean_s_after_step1"]
        print(f"{name:10s} step {res['step_s_after_step1']:.2f}s  " +
              "  ".join(f"{k} {v:.3f}" for k, v in m.items()) +
              f"  rss after load {res['rss_after_load_mb']:.0f}MB peak {res['peak_rss_mb']:.0f}MB  "
              f"loss[-1] {res['losses'][-1]:.6f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
