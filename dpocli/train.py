"""Stage 2: train the policy from the reference cache alone (the reference model is never loaded).

The loop in `run_train` reads top to bottom: plan the step's micro-batches -> policy forward
(completion-only, chunked LM head) -> loss against cached reference sums -> backward -> clip ->
step -> log -> maybe eval / checkpoint.

Assumptions:
* Batch order is a pure function of (seed, epoch): resuming needs only the step and the position
  in the epoch, stored in each checkpoint. On CPU in fp32, a resumed run ends with bitwise the
  same weights as an uninterrupted one; on GPU only with deterministic kernels.
* The loss of a step is the mean over all its pairs (every micro-batch, every rank): each micro
  loss is weighted by its share of the step's pairs, times world size because DDP averages.
* Global batch = batch_size x ranks x grad_accum pairs; a 2-rank run with batch_size b follows a
  1-rank run with batch_size 2b (up to fp rounding and batch-level losses such as aot).
* learning_rate in metrics.jsonl is the rate applied at that step (HF logs the next step's).
"""

from __future__ import annotations

import json
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from dpocli import __version__, cache, checkpoint, distributed, outputs
from dpocli.attention import describe as describe_attention
from dpocli.batching import plan_epoch
from dpocli.console import ProgressBar, log, sigterm_as_interrupt
from dpocli.errors import (DpocliError, Interrupted, RunFailure, check_at_least, check_seed,
                           out_of_memory_types)
from dpocli.logprobs import CompletionScorer, sequence_logps
from dpocli.losses import LOSS_OPTIONS, LossInputs, LossSpec, compute_loss, spec_from_options
from dpocli.metrics import MetricsLog, StepMetrics, rename_for_eval
from dpocli.modeling import (DTYPES, STEP0_TOLERANCE, active_dropout, load_causal_lm, resolve_device,
                             weights_fingerprint)
from dpocli.packing import check_layout_flags
from dpocli.policy import load_policy_tokenizer, check_vocab
from dpocli.schedule import make_optimizer, make_scheduler
from dpocli.scoring import cache_batch, cached_reference, score_cache


@dataclass(frozen=True)
class TrainConfig:
    cache: str
    model: str
    out: str
    beta: float = 0.1
    loss: str = "sigmoid"
    loss_weights: str | None = None
    label_smoothing: float = 0.0
    ipo_length_normalized: bool = True
    discopop_tau: float = 0.05
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5  # TRL's f_alpha_divergence_coef default
    lr: float = 1e-6  # TRL's default
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    scheduler: str = "linear"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "float32"
    autocast: str | None = None  # bfloat16 / float16 mixed precision over fp32 weights
    device: str | None = None
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 sharding under torchrun (default there: DDP)
    lora_r: int | None = None  # LoRA rank; None = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str | None = None  # None = peft's default for the architecture
    merge: bool = False  # with LoRA: also save base+adapter merged to RUN_DIR/merged
    compile: bool = False  # torch.compile the transformer body
    prefix_sharing: bool = False  # one row per pair: prompt + chosen + rejected, prompt run once
    packing: bool = False  # padding-free: all sequences of a micro-batch in one row
    report_to: str | None = None  # tensorboard, wandb (comma-separated), beside metrics.jsonl
    shuffle: bool = True
    group_by_length: bool = False
    save_every: int | None = None
    save_total_limit: int | None = None
    eval_cache: str | None = None
    eval_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    skip_step0_check: bool = False
    keep_dropout: bool = False  # TRL's disable_dropout=True is the default
    allow_tokenizer_mismatch: bool = False
    trust_remote_code: bool = False
    chunk_size: int = 1024

    def loss_spec(self) -> LossSpec:
        return spec_from_options(**{name: getattr(self, name) for name in LOSS_OPTIONS})

    def check(self) -> None:
        positive = {"--lr": self.lr, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--epochs": self.epochs}
        for flag, value in positive.items():
            if not value > 0:
                raise DpocliError(f"must be > 0, got {value}", field=flag)
        check_at_least({"--max-steps": self.max_steps, "--save-every": self.save_every,
                        "--eval-every": self.eval_every, "--save-total-limit": self.save_total_limit}, 1)
        # 0 has a meaning for these: no warm-up, no weight decay, no clipping (--max-grad-norm 0).
        check_at_least({"--warmup-steps": self.warmup_steps, "--weight-decay": self.weight_decay,
                        "--max-grad-norm": self.max_grad_norm}, 0)
        check_seed(self.seed)
        if self.scheduler not in ("constant", "linear", "cosine"):
            raise DpocliError(f"'{self.scheduler}' is not one of constant, linear, cosine",
                              field="--scheduler")
        if not 0 <= self.warmup_ratio < 1:
            raise DpocliError(f"must be in [0, 1), got {self.warmup_ratio}", field="--warmup-ratio")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise DpocliError(f"'{self.autocast}' is not bfloat16 or float16", field="--autocast")
        if self.fsdp and int(__import__("os").environ.get("WORLD_SIZE", "1")) < 2:
            raise DpocliError("needs a torchrun launch with 2 or more processes", field="--fsdp",
                              hint="torchrun --nproc-per-node N $(which dpo) train ... --fsdp")
        from dpocli.integrations import check as check_report_to
        check_report_to(self.report_to)
        check_layout_flags(self.prefix_sharing, self.packing, self.attn_implementation)
        if self.compile and self.fsdp:
            raise DpocliError("is not supported together with --fsdp", field="--compile")
        if self.lora_r is not None and (self.lora_r < 1 or self.fsdp):
            raise DpocliError("must be >= 1 and cannot be combined with --fsdp", field="--lora-r")
        if self.lora_dropout and not self.keep_dropout:
            # TRL's disable_dropout would zero it silently; a flag that does nothing is refused.
            raise DpocliError("has no effect: dropout is off in training unless --keep-dropout is given",
                              field="--lora-dropout", hint="add --keep-dropout, or drop --lora-dropout")
        if self.merge and self.lora_r is None:
            raise DpocliError("only applies to LoRA runs", field="--merge", hint="add --lora-r N")
        if self.eval_every and not self.eval_cache:
            raise DpocliError("needs --eval-cache", field="--eval-every")


def _cache_identity(manifest, data) -> dict:
    """What a resumed run must find again: the same spec and the same rows in the same order."""
    import hashlib
    ids = hashlib.sha256("\n".join(data.ids).encode("utf-8")).hexdigest()
    return {"spec_fingerprint": manifest.spec_fingerprint, "ids_sha256": ids}


def _load_caches(cfg: TrainConfig):
    manifest, data = cache.load_cache(cfg.cache)
    eval_cache = None
    if cfg.eval_cache:
        eval_cache = cache.load_cache(cfg.eval_cache)
        eval_manifest = eval_cache[0]
        for key in ("conventions", "tokenizer"):
            differs = cache.explain_mismatch(manifest.spec[key], eval_manifest.spec[key], key)
            if differs:
                raise DpocliError(f"was made differently from the training cache ({differs})",
                                  file=cfg.eval_cache, field=key)
    return manifest, data, eval_cache


def _step0_check(cfg, manifest, diff: float, dist, dropout: list[str] = ()) -> dict:
    """Policy == reference at step 0 must reproduce the cached values (catches tokenization,
    precision and parallelism drift). Enforced only when the policy has the reference's weights.
    `dropout`: the policy's active dropout settings (only with --keep-dropout), named in the hint."""
    same_weights = weights_fingerprint(cfg.model)["sha256"] == manifest.spec["reference_model"]["sha256"]
    tolerance = STEP0_TOLERANCE[cfg.autocast or cfg.dtype]
    if same_weights:
        log(f"step-0 check: max |policy - cached reference| = {diff:.3g} (tolerance {tolerance:g})")
        if diff > tolerance and not cfg.skip_step0_check:
            raise RunFailure(
                f"step-0 check failed: the policy starts from the reference's weights but its log-probs "
                f"differ from the cache by up to {diff:.3g} (> {tolerance:g} for {cfg.autocast or cfg.dtype})",
                hint=(f"--keep-dropout leaves dropout on in training ({', '.join(dropout)}), so the "
                      "policy's log-probs are noisy; drop --keep-dropout" if dropout else
                      "precompute and train with the same --dtype / attention implementation, or pass "
                      "--skip-step0-check"))
    else:
        log(f"step-0: policy weights differ from the cache's reference (max |Δ| = {diff:.3g}); "
            "rewards start away from 0")
    return {"step0_max_abs_diff": diff, "step0_policy_is_reference": same_weights}


def _evaluate(scorer, model, eval_cache, spec, pad_id, device, dist) -> dict:
    """eval_* metrics over the whole eval cache with the current weights."""
    eval_manifest, eval_data = eval_cache
    model.eval()
    pc, pr = score_cache(scorer, eval_data, eval_manifest, pad_id, device, dist=dist)
    ref = cached_reference(eval_data, range(eval_data.num_rows), "cpu")
    out = compute_loss(LossInputs(pc, pr, ref["ref_chosen_logps"], ref["ref_rejected_logps"],
                                  ref["chosen_len"], ref["rejected_len"]), spec)
    acc = StepMetrics()
    acc.add(out, pc, pr)
    model.train()
    return rename_for_eval(acc.means(distributed.DistContext()))


def _wrap(scorer, model, device, dist, cfg):
    """DDP under torchrun by default, FSDP2 with --fsdp, nothing in a single process."""
    if cfg.fsdp:
        return distributed.shard_model(model, scorer, DTYPES[cfg.autocast] if cfg.autocast else None)
    if not dist.enabled:
        return scorer
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    # Buffers (rotary tables) are identical on every rank; skip their per-forward broadcast.
    return DistributedDataParallel(scorer, device_ids=ids, broadcast_buffers=False)


def _grad_sync(scorer, sync: bool):
    """Context for one micro-batch: gradients are reduced across ranks only when `sync`."""
    if hasattr(scorer, "set_requires_gradient_sync"):  # FSDP2: a flag on the module
        scorer.set_requires_gradient_sync(sync)
        return nullcontext()
    if hasattr(scorer, "no_sync") and not sync:  # DDP: a context manager
        return scorer.no_sync()
    return nullcontext()


def _rank_rows(micro: list[int], dist) -> tuple[list[int], bool]:
    """This rank's contiguous share of a global micro-batch. A rank left with nothing (a short last
    batch) scores one row with zero weight, because DDP needs every rank in every backward."""
    per = -(-len(micro) // dist.world_size)
    rows = micro[dist.rank * per:(dist.rank + 1) * per]
    return (rows, True) if rows else (micro[:1], False)


def run_train(cfg: TrainConfig, resolved_toml: str | None = None) -> dict:
    t_start = time.perf_counter()
    cfg.check()
    spec = cfg.loss_spec()
    dist = distributed.current()
    manifest, data, eval_set = _load_caches(cfg)
    tokenizer = load_policy_tokenizer(cfg, manifest)
    identity = _cache_identity(manifest, data)
    run_dir = Path(cfg.out)
    outputs.check_output_location(run_dir, {"--model": cfg.model, "the cache": cfg.cache,
                                            "--eval-cache": cfg.eval_cache})
    # Look only: every check (folder, device, model) passes before anything is created or deleted.
    # attention_kernel: a record of what ran, not a setting (the kernels agree to rounding)
    config = {**asdict(cfg), "attention_kernel": describe_attention(cfg.packing, cfg.attn_implementation)}
    plan = checkpoint.inspect_run_dir(run_dir, config, identity, resume=cfg.resume,
                                      overwrite=cfg.overwrite,
                                      defaults={f.name: f.default for f in fields(TrainConfig)})
    resume_from = plan.resume_from

    torch.manual_seed(cfg.seed)
    device = dist.device_for(resolve_device(cfg.device))
    # LoRA checkpoints hold only the adapter, so LoRA always starts from the base weights.
    weights_path = str(resume_from[1]) if resume_from and cfg.lora_r is None else cfg.model
    model = load_causal_lm(weights_path, dtype=cfg.dtype, device=device,
                           attn_implementation=cfg.attn_implementation,
                           trust_remote_code=cfg.trust_remote_code, keep_dropout=cfg.keep_dropout)
    check_vocab(model, data, cfg.cache)
    if cfg.lora_r is not None:
        from dpocli import lora
        model = (lora.resume(model, resume_from[1]) if resume_from else
                 lora.wrap(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules))
        log(lora.trainable_summary(model))

    sink_dirs = tuple(name for name in ("tensorboard", "wandb") if name in (cfg.report_to or ""))
    run = dist.on_main_then_broadcast(lambda: checkpoint.RunDir.claim(
        plan, config, identity, resolved_toml, sink_dirs + (("merged",) if cfg.merge else ())))
    sinks = []
    if dist.is_main and cfg.report_to:
        from dpocli.integrations import make_sinks
        sinks = make_sinks(cfg.report_to, run_dir, asdict(cfg))
    metrics_log = MetricsLog(run_dir / checkpoint.METRICS, enabled=dist.is_main, sinks=sinks)
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    scorer = _wrap(CompletionScorer(model, chunk_size=cfg.chunk_size, compile=cfg.compile), model,
                   device, dist, cfg)
    pad_id = int(manifest.spec["tokenizer"]["pad_token_id"])

    # Global micro-batches hold batch_size pairs per rank; a step is grad_accum of them.
    global_batch = cfg.batch_size * dist.world_size
    seq_lens = [data.seq_len(i) for i in range(data.num_rows)] if cfg.group_by_length else None
    micro_per_epoch = math.ceil(data.num_rows / global_batch)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = make_scheduler(optimizer, cfg.scheduler, warmup, total_steps)

    step, epoch, micro_index, num_tokens, extra = 0, 0, 0, 0, {}
    if resume_from:
        state, tensors = checkpoint.load_trainer_state(resume_from[1])
        distributed.load_optimizer_state(model, optimizer, tensors["optimizer"], cfg.fsdp)
        scheduler.load_state_dict(tensors["scheduler"])
        checkpoint.set_rng_state(tensors["rng"])
        if state.get("global_batch", global_batch) != global_batch:
            raise DpocliError(
                f"was saved with a global batch of {state['global_batch']} pairs (batch size x ranks); "
                f"this run has {global_batch}", file=resume_from[1], field="global_batch",
                hint=f"choose --batch-size so that batch size x ranks = {state['global_batch']}")
        step, epoch, micro_index = state["step"], state["epoch"], state["micro_index"]
        num_tokens, extra = state["num_tokens"], state.get("step0", {})
        metrics_log.truncate_after(step)
        log(f"resuming from {resume_from[1]} (step {step} of {total_steps})")
    elif cfg.resume:
        log("nothing to resume yet; starting from step 0")
        metrics_log.truncate_after(0)

    # With FSDP the mixed-precision policy casts parameters instead of autocast.
    autocast = (torch.autocast(device.type, dtype=DTYPES[cfg.autocast])
                if cfg.autocast and not cfg.fsdp else nullcontext())
    last_saved = resume_from[0] if resume_from else None

    def save(at_step: int) -> None:
        nonlocal last_saved
        if last_saved == at_step:
            return
        # Gathering full weights is a collective under FSDP: every rank takes part.
        model_state, optim_state = distributed.full_state_dicts(model, optimizer, cfg.fsdp)
        if dist.is_main:
            state = {"step": at_step, "epoch": epoch, "micro_index": micro_index,
                     "global_batch": global_batch, "world_size": dist.world_size,
                     "num_tokens": num_tokens, "step0": extra, "dpocli_version": __version__}
            run.save_checkpoint(at_step, model, tokenizer, optim_state, scheduler, state, model_state)
            run.prune(cfg.save_total_limit)
        last_saved = at_step
        dist.barrier()

    def abandon_if_unstarted() -> None:
        # A run that fails before its first step (step-0 check, OOM, Ctrl-C) leaves nothing
        # behind, so the corrected rerun is not refused by a half-started run.
        if step == 0 and plan.record is None and dist.is_main:
            run.abandon()

    bar_cm = ProgressBar("train", total_steps) if dist.is_main else nullcontext()
    # SIGTERM (a scheduler's pre-emption, `kill`) takes the same path as Ctrl-C: save and exit 130.
    try:
        with sigterm_as_interrupt(), bar_cm as bar:
            if bar is not None:
                bar.update(step)
            while step < total_steps:
                batches = plan_epoch(data.num_rows, global_batch, epoch=epoch, seed=cfg.seed,
                                     shuffle=cfg.shuffle, seq_lens=seq_lens,
                                     group_by_length=cfg.group_by_length)
                if micro_index >= len(batches):
                    epoch, micro_index = epoch + 1, 0
                    continue
                t_step = time.perf_counter()
                micros = batches[micro_index:micro_index + cfg.grad_accum]
                step_pairs = sum(len(m) for m in micros)
                step_metrics, step_tokens = StepMetrics(), 0
                for k, micro in enumerate(micros):
                    rows, real = _rank_rows(micro, dist)
                    batch = cache_batch(data, rows, pad_id, cfg.prefix_sharing, cfg.packing).to(device)
                    ref = cached_reference(data, rows, device)
                    # Gradients sync across ranks only on the step's last micro-batch.
                    sync = k == len(micros) - 1 or not dist.enabled
                    with _grad_sync(scorer, sync), autocast:
                        policy = sequence_logps(scorer, batch)
                    out = compute_loss(LossInputs(policy.chosen_logps, policy.rejected_logps,
                                                  ref["ref_chosen_logps"], ref["ref_rejected_logps"],
                                                  ref["chosen_len"], ref["rejected_len"]), spec)
                    weight = (len(rows) / step_pairs * dist.world_size) if real else 0.0
                    with _grad_sync(scorer, sync):
                        (out.loss * weight).backward()
                    if step == 0 and k == 0 and not extra:
                        diff = torch.cat([(policy.chosen_logps - ref["ref_chosen_logps"]).abs(),
                                          (policy.rejected_logps - ref["ref_rejected_logps"]).abs()]).detach()
                        diff = float(dist.max_over_ranks(float(diff.max())))
                        extra = _step0_check(cfg, manifest, diff, dist,
                                             active_dropout(model) if cfg.keep_dropout else [])
                    if real:
                        step_metrics.add(out, policy.chosen_logps, policy.rejected_logps)
                        step_tokens += batch.num_tokens
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                lr = scheduler.get_last_lr()[0]
                means = step_metrics.means(dist)
                if not (math.isfinite(means["loss"]) and math.isfinite(grad_norm)):
                    good = run_dir / f"checkpoint-{last_saved}" if last_saved else cfg.model
                    raise RunFailure(
                        f"non-finite {'loss' if not math.isfinite(means['loss']) else 'gradient norm'} "
                        f"at step {step + 1}; the last good checkpoint is "
                        f"{good if last_saved else 'none'}",
                        hint=f"start a new run from {good} with a lower --lr (or --dtype float32): "
                             f"dpo train {cfg.cache} --model {good} --out NEW_DIR ... "
                             "(--resume keeps the original settings)")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                micro_index += len(micros)
                tokens_all = dist.all_gather_object(step_tokens)
                num_tokens += sum(tokens_all)
                seconds = time.perf_counter() - t_step
                record = {"step": step, **means, "grad_norm": grad_norm, "learning_rate": lr,
                          "epoch": round(epoch + micro_index / len(batches), 6),
                          "num_tokens": num_tokens, "tokens_per_s": round(sum(tokens_all) / seconds, 1),
                          "pairs_per_s": round(step_pairs / seconds, 2),
                          "elapsed_s": round(time.perf_counter() - t_start, 3)}
                metrics_log.write(record)
                if bar is not None:
                    bar.update(1, loss=f"{means['loss']:.4f}",
                               acc=f"{means['rewards/accuracies']:.2f}",
                               margin=f"{means['rewards/margins']:.3f}")
                if eval_set is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    evals = _evaluate(scorer, model, eval_set, spec, pad_id, device, dist)
                    metrics_log.write({"step": step, **evals})
                if cfg.save_every and step % cfg.save_every == 0:
                    save(step)
    except out_of_memory_types():
        abandon_if_unstarted()
        raise RunFailure(f"out of memory at step {step + 1} (batch of {cfg.batch_size} pairs per rank)",
                         hint="lower --batch-size and raise --grad-accum, add --gradient-checkpointing, "
                              "or use --autocast bfloat16") from None
    except KeyboardInterrupt:
        # Partial gradients of an unfinished step are discarded; the checkpoint is the last
        # completed step, and the run resumes from exactly there.
        optimizer.zero_grad(set_to_none=True)
        if step > 0:
            save(step)
        abandon_if_unstarted()
        where = f"checkpoint-{last_saved}" if last_saved else "no checkpoint (step 0)"
        raise Interrupted(f"interrupted at step {step}; saved {where}",
                          hint=f"resume with the same command plus --resume (out: {run_dir})") from None
    except BaseException:
        abandon_if_unstarted()
        raise

    final_eval = {}
    if eval_set is not None:
        final_eval = _evaluate(scorer, model, eval_set, spec, pad_id, device, dist)
        if not (cfg.eval_every and step % cfg.eval_every == 0):
            metrics_log.write({"step": step, **final_eval})
    save(step)
    metrics_log.close()
    model_state, _ = distributed.full_state_dicts(model, optimizer, cfg.fsdp)
    if dist.is_main:
        run.save_final(model, tokenizer, model_state)
        if cfg.merge:
            run.save_merged(model.merge_and_unload(), tokenizer)
    dist.barrier()
    return _summary(cfg, run_dir, step, total_steps, extra, metrics_log, final_eval, t_start, device)


def _summary(cfg, run_dir, step, total_steps, extra, metrics_log, final_eval, t_start, device) -> dict:
    last = {}
    if metrics_log.path.exists():
        for line in metrics_log.path.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                last = rec
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return {"command": "train", "dpocli_version": __version__, "run_dir": str(run_dir),
            "model_dir": str(run_dir), "steps": step, "total_steps": total_steps,
            "seconds": round(time.perf_counter() - t_start, 3), **extra,
            "attention_kernel": describe_attention(cfg.packing, cfg.attn_implementation),
            "last_train_metrics": last, "eval": final_eval, **peak}
