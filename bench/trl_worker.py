"""One TRL 1.16 DPOTrainer run, in its own process (started by bench_vs_trl.py; run it with the
benchmark venv's python, which has trl installed: /work/benchenv/bin/python).

Settings are set explicitly so they match `dpo train` (TRL's own defaults differ: bf16 on, gradient
checkpointing on, lr 1e-6, fused AdamW, shuffled batches):
fp32 on CPU (or --device cuda --dtype bfloat16: bf16 weights and bf16=True), no gradient
checkpointing, AdamW (--optim: torch non-fused by default, fused for the GPU benchmark; HF
defaults betas 0.9/0.999, eps 1e-8, weight decay 0), linear decay with no warm-up,
max_grad_norm 1.0, sigmoid loss, beta, lr, batch size, max_length, seed, logging every step, and
SEQUENTIAL batches (the sampler is replaced by a SequentialSampler, the equivalent of
`dpo train --no-shuffle`).

Writes one JSON file (--result) with per-step metrics and timings:
  step_end_s[k]   seconds from process start (this script's first line) to the end of step k+1
  train_begin_s   seconds from process start to on_train_begin
  precompute_s    time spent inside DPOTrainer._precompute_ref_logps (the reference pass), if any
  hash_s          time spent in trl's hash_module (only with precompute: it fingerprints the weights)
  construct_s     time of DPOTrainer(...) (tokenization, model + reference loading, precompute)
  steps           per step: TRL's logged metrics plus the exact (unrounded) loss of compute_loss
  peak_gpu_mem_mb torch.cuda.max_memory_allocated() over the whole process (--device cuda only)
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# A fresh datasets cache per run, so TRL's precompute can never be served from an earlier run's file.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="bench-hfds-")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    ap.add_argument("--precompute-batch-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after this many steps, keeping the schedule of the full run (the lr "
                         "still decays over --epochs/--max-steps, as in the dpocli run it is compared to)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--optim", default="adamw_torch")
    ap.add_argument("--no-save", action="store_true", help="skip trainer.save_model() at the end")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights dtype; bfloat16 also turns on TRL's bf16 (autocast) flag")
    args = ap.parse_args()

    import torch
    import trl
    import trl.trainer.dpo_trainer as dpo_mod
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    timings = {"precompute_s": 0.0, "hash_s": 0.0}
    losses: list[float] = []

    real_hash = dpo_mod.hash_module

    def timed_hash(module):
        t = time.perf_counter()
        try:
            return real_hash(module)
        finally:
            timings["hash_s"] += time.perf_counter() - t

    dpo_mod.hash_module = timed_hash

    class BenchDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                timings["precompute_s"] += time.perf_counter() - t

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                loss = out[0] if isinstance(out, tuple) else out
                losses.append(float(loss.detach()))
            return out

    step_end: list[float] = []
    step_cpu: list[float] = []
    marks: dict[str, float] = {}

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    class Clock(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            marks["train_begin_s"] = time.perf_counter() - T0

        def on_step_end(self, args_, state, control, **kw):
            step_end.append(time.perf_counter() - T0)
            step_cpu.append(cpu())
            if args.stop_after and state.global_step >= args.stop_after:
                control.should_training_stop = True

    rows = [json.loads(line) for line in open(args.data)]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    config = DPOConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps else -1,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        optim=args.optim,
        max_grad_norm=1.0,
        bf16=args.dtype == "bfloat16", fp16=False,
        gradient_checkpointing=False,
        use_cpu=args.device == "cpu",
        seed=args.seed, data_seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=args.max_length,
        truncation_mode="keep_start",
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=args.precompute,
        precompute_ref_batch_size=args.precompute_batch_size,
        model_init_kwargs={"dtype": args.dtype},
    )
    t = time.perf_counter()
    trainer = BenchDPOTrainer(model=args.model, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Clock()])
    construct_s = time.perf_counter() - t
    ds = trainer.train_dataset
    p = [len(x) for x in ds["prompt_ids"]]
    c = [len(x) for x in ds["chosen_ids"]]
    r = [len(x) for x in ds["rejected_ids"]]

    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    end_train_s = time.perf_counter() - T0
    save_s = 0.0
    if not args.no_save:
        t = time.perf_counter()
        trainer.save_model(os.path.join(args.out, "final"))
        save_s = time.perf_counter() - t

    steps = [dict(h) for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    for i, rec in enumerate(steps):
        rec["step"] = rec.get("step", i + 1)
        if i < len(losses):
            rec["loss_logged"] = rec["loss"]
            rec["loss"] = losses[i]
    result = {
        "tool": "trl", "trl_version": trl.__version__, "torch": torch.__version__,
        "mode": "precompute" if args.precompute else "default",
        "argv": sys.argv,
        "config": {k: getattr(config, k) for k in (
            "per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "warmup_steps", "optim",
            "weight_decay", "max_grad_norm", "bf16", "gradient_checkpointing", "max_length", "beta",
            "loss_type", "precompute_ref_log_probs", "precompute_ref_batch_size", "seed")},
        "ref_model_in_memory": trainer.ref_model is not None,
        "construct_s": construct_s, "train_s": train_s, "save_s": save_s,
        "train_begin_s": marks.get("train_begin_s"), "step_end_s": step_end, "step_cpu_s": step_cpu,
        "total_steps_planned": trainer.state.max_steps, "stopped_after": args.stop_after,
        "end_train_s": end_train_s, "total_s": time.perf_counter() - T0, "total_cpu_s": cpu(),
        "precompute_s": timings["precompute_s"], "hash_s": timings["hash_s"],
        "rows": len(p), "prompt_tokens": sum(p), "chosen_tokens": sum(c), "rejected_tokens": sum(r),
        "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "device": args.device, "dtype": args.dtype,
        "peak_gpu_mem_mb": (torch.cuda.max_memory_allocated() / 2**20
                            if args.device == "cuda" else None),
        "steps": steps,
    }
    with open(args.result, "w") as f:
        json.dump(result, f, default=str)


if __name__ == "__main__":
    main()
