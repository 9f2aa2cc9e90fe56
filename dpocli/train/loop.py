"""Stage 2: train the policy from the reference cache alone (the reference model is never loaded).

`run_train` sets up (caches, run folder, policy, optimizer, resume), then runs `_train_step`, read
top to bottom: micro-batches -> policy forward (completion-only, chunked LM head) -> loss against
the cached reference sums -> backward -> clip -> step -> log. Run folder (train/checkpoint.py),
policy and step-0 check (scoring/policy.py), wrapping (model/distributed.py) live elsewhere: the
loop has no mode branches.

Assumptions:
* Batch order is a pure function of (seed, epoch): resuming needs only the step and the position
  in the epoch, stored in each checkpoint. On CPU in fp32, a resumed run ends with bitwise the
  same weights as an uninterrupted one; on GPU only with deterministic kernels.
* The loss of a step is the mean over all its pairs (every micro-batch, every rank): each micro
  loss is weighted by its share of the step's pairs, times world size because DDP averages.
* Global batch = batch_size x ranks x grad_accum pairs; a 2-rank run with batch_size b follows a
  1-rank run with batch_size 2b (up to fp rounding and batch-level losses such as aot).
* With --fsdp no rank holds the whole model or optimizer: the policy is loaded shard by shard,
  checkpoints are DCP (resumable on another number of ranks with the same global batch, also on
  one process via `torchrun --nproc-per-node 1`), the final folder is streamed (sharding.py).
  LoRA with --fsdp loads the base whole on each rank before sharding it (policy.py).
* learning_rate in metrics.jsonl is the rate applied at that step (HF logs the next step's).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dpocli.cache import store as cache
from dpocli.eval.evaluate import evaluate_policy
from dpocli.io import ownership as outputs
from dpocli.io.console import ProgressBar, log, sigterm_as_interrupt
from dpocli.io.folder_lock import FolderLock
from dpocli.model import distributed
from dpocli.model.attention import describe as describe_attention
from dpocli.model.batching import plan_epoch
from dpocli.model.devices import resolve_device
from dpocli.model.load import DTYPES
from dpocli.model.logprobs import router_aux_coefficient, sequence_logps
from dpocli.objective.losses import LossInputs, LossSpec, compute_loss
from dpocli.objective.metrics import MetricsLog, StepMetrics, rename_for_eval
from dpocli.options import OptimOpts, group_of
from dpocli.scoring import shared_cache
from dpocli.scoring.policy import build_policy, load_policy_tokenizer, merged_policy, step0_check
from dpocli.scoring.replay import cache_batch, cached_reference, check_token_logps
from dpocli.scoring.vlm import prepare_train_caches
from dpocli.train import checkpoint, checkpoint_state, run_summary
from dpocli.train import dashboards as integrations
from dpocli.train.checkpoint_state import TrainState
from dpocli.train.config import TrainConfig
from dpocli.train.failures import as_run_failure, non_finite
from dpocli.train.schedule import make_optimizer, make_scheduler


@dataclass
class _Session:
    """Everything the loop uses that does not change from step to step."""

    cfg: TrainConfig
    spec: LossSpec
    dist: distributed.DistContext
    data: cache.CacheData
    manifest: cache.Manifest
    run: checkpoint.RunDir | None  # None on ranks other than 0: only rank 0 writes
    run_dir: Path
    model: torch.nn.Module
    scorer: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    autocast: object
    pad_id: int
    global_batch: int
    total_steps: int
    metrics_log: MetricsLog
    eval_set: tuple | None
    seq_lens: list[int] | None  # for --group-by-length
    t_start: float
    last_eval: tuple = (None, {})  # (step, eval_* metrics) of the newest periodic eval
    totals: run_summary.TrainTotals | None = None  # per-step losses and timing for HF's train_* summary


def run_train(cfg: TrainConfig, resolved_toml: str | None = None) -> dict:
    with FolderLock(cfg.out, "train") as lock:  # one writer per run folder: rank 0 holds it
        return _run_train(cfg, resolved_toml, lock)


def _run_train(cfg: TrainConfig, resolved_toml: str | None, lock: FolderLock) -> dict:
    t_start = time.perf_counter()
    cfg.check()
    spec = cfg.loss_spec()
    dist = distributed.current()
    distributed.fix_mmap_threshold()  # freed activations go back to the system between steps
    cfg = cfg.with_layout(checkpoint.started_layout(Path(cfg.out)) if cfg.resume else None)
    manifest, data = shared_cache.load_cache(cfg.cache)  # one copy per node under torchrun
    cfg.check_steps(data.num_rows, dist.world_size)
    eval_set = cache.load_matching_cache(cfg.eval_cache, manifest, loader=shared_cache.load_cache) \
        if cfg.eval_cache else None
    processor = prepare_train_caches(cfg, manifest, data, eval_set)  # vision-language caches only
    if cfg.ld_alpha is not None:  # LD-DPO needs per-token reference values: checked before any write
        check_token_logps("--ld-alpha", (cfg.cache, data), *[(cfg.eval_cache, e[1]) for e in [eval_set] if e])
    tokenizer = load_policy_tokenizer(cfg, manifest)
    tokenizer = tokenizer if processor is None else processor  # a VLM's checkpoints ship its processor
    run_dir = Path(cfg.out)
    outputs.check_output_location(run_dir, {"--model": cfg.model, "the cache": cfg.cache,
                                            "--eval-cache": cfg.eval_cache})
    # Look only: every check (folder, device, model) passes before anything is created or deleted.
    # attention_kernel: a record of what ran, not a setting (the kernels agree to rounding)
    config = {**asdict(cfg), "attention_kernel": describe_attention(cfg.packing, cfg.attn_implementation)}
    identity = cache.identity(manifest, data)
    plan = checkpoint.plan_run(dist, lock, cfg, config, identity, data.num_rows)
    torch.manual_seed(cfg.seed)
    device = dist.device_for(resolve_device(cfg.device))
    model, scorer = build_policy(cfg, data, plan.resume_from, device)
    spec = replace(spec, router_aux_loss_coef=router_aux_coefficient(model, cfg.router_aux_loss_coef))
    extra_files = tuple(n for n in ("tensorboard", "wandb") if n in (cfg.report_to or ""))
    run = dist.on_main_then_broadcast(lambda: checkpoint.RunDir.claim(
        plan, config, identity, resolved_toml, extra_files + (("merged",) if cfg.merge else ()), lock))
    s = _session(cfg, spec, dist, manifest, data, eval_set, run if dist.is_main else None, run_dir,
                 model, scorer, tokenizer, device, t_start)
    state = _resumed_state(s, plan)

    try:
        with sigterm_as_interrupt(), (ProgressBar("train", s.total_steps) if dist.is_main
                                      else nullcontext()) as bar:
            if bar is not None:
                bar.update(state.step)
            while state.step < s.total_steps:
                _train_step(s, state, bar)
    except BaseException as err:
        if state.step == 0 and plan.record is None and dist.is_main:
            # A run that fails before its first step leaves nothing behind, so the corrected
            # rerun is not refused by a half-started run.
            run.abandon()
        raise as_run_failure(s, state, err, save=lambda: _save(s, state)) from None

    final_eval = _final_eval(s, state.step)
    _save(s, state)
    hf = run_summary.log_and_close(s, state)  # as HF's train(): logged before the final model is saved
    checkpoint.save_final_model(s.run, dist, model, tokenizer, cfg.fsdp)
    if dist.is_main and cfg.merge:
        run.save_merged(merged_policy(cfg, model, run_dir), tokenizer)
    dist.barrier()
    return run_summary.train_summary(s, state, final_eval, t_start, hf)


def _train_step(s: _Session, state: TrainState, bar) -> None:
    """One optimizer step: grad_accum micro-batches of global_batch pairs, split across ranks."""
    cfg, dist = s.cfg, s.dist
    batches = plan_epoch(s.data.num_rows, s.global_batch, epoch=state.epoch, seed=cfg.seed,
                         shuffle=cfg.shuffle, seq_lens=s.seq_lens, group_by_length=cfg.group_by_length)
    if state.micro_index >= len(batches):
        state.epoch, state.micro_index = state.epoch + 1, 0
        return
    t_step = time.perf_counter()
    micros = batches[state.micro_index:state.micro_index + cfg.grad_accum]
    step_pairs = sum(len(m) for m in micros)
    step_metrics, step_tokens = StepMetrics(), 0
    for k, micro in enumerate(micros):
        rows, real = distributed.rank_rows(micro, dist)
        batch = cache_batch(s.data, rows, s.pad_id, cfg.prefix_sharing, cfg.packing).to(s.device)
        ref = cached_reference(s.data, rows, s.device, s.spec.ld_alpha)
        last = k == len(micros) - 1  # gradients sync across ranks only on the last micro-batch
        with distributed.grad_sync(s.scorer, last), s.autocast:
            policy = sequence_logps(s.scorer, batch, token_stats=True, ld_alpha=s.spec.ld_alpha,
                                    router_aux=s.spec.router_aux_loss_coef != 0)
        out = compute_loss(LossInputs.from_logps(policy, ref), s.spec)
        weight = (len(rows) / step_pairs * dist.world_size) if real else 0.0
        with distributed.grad_sync(s.scorer, last):
            (out.loss * weight).backward()
        if state.step == 0 and k == 0 and not state.step0:
            diff = torch.cat([(policy.chosen_logps - ref.chosen_logps).abs(),
                              (policy.rejected_logps - ref.rejected_logps).abs()]).detach()
            state.step0 = step0_check(cfg, s.manifest, float(dist.max_over_ranks(float(diff.max()))),
                                      s.model)
        step_metrics.add_tokens(policy, real)
        if real:
            step_metrics.add(out, policy.chosen_logps, policy.rejected_logps)
            step_tokens += s.data.trl_tokens(rows)
    grad_norm = distributed.clip_grad_norm(s.model, cfg.max_grad_norm)
    lr = s.scheduler.get_last_lr()[0]
    means = step_metrics.means(dist)
    if not (math.isfinite(means["loss"]) and math.isfinite(grad_norm)):
        what = "loss" if not math.isfinite(means["loss"]) else "gradient norm"
        raise non_finite(s.cfg, s.run_dir, state, what)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.micro_index += len(micros)
    tokens_all = dist.all_gather_object(step_tokens)
    state.num_tokens += sum(tokens_all)
    seconds = time.perf_counter() - t_step
    s.metrics_log.write({
        "step": state.step, **means, "grad_norm": grad_norm, "learning_rate": lr,
        "epoch": round(state.epoch + state.micro_index / len(batches), 6), "num_tokens": state.num_tokens,
        "tokens_per_s": round(sum(tokens_all) / seconds, 1), "pairs_per_s": round(step_pairs / seconds, 2),
        "elapsed_s": round(time.perf_counter() - s.t_start, 3)})
    if bar is not None:
        bar.update(1, loss=f"{means['loss']:.4f}", acc=f"{means['rewards/accuracies']:.2f}",
                   margin=f"{means['rewards/margins']:.3f}")
    if s.eval_set is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
        s.last_eval = (state.step, _evaluate(s))
        s.metrics_log.write({"step": state.step, **s.last_eval[1]})
    if cfg.save_every and state.step % cfg.save_every == 0:
        _save(s, state)


def _session(cfg, spec, dist, manifest, data, eval_set, run, run_dir, model, scorer, tokenizer,
             device, t_start) -> _Session:
    """Optimizer, schedule, metrics log and batch geometry of a run whose folder is claimed."""
    sinks = [run_summary.TrainTotals()]  # train_runtime counts from here, the end of set-up (as HF's)
    if dist.is_main and cfg.report_to:
        run.add(*integrations.folders(cfg.report_to))  # listed before the sinks create them
        sinks += integrations.make_sinks(cfg.report_to, run_dir, asdict(cfg))
    # Global micro-batches hold batch_size pairs per rank; a step is grad_accum of them.
    global_batch = cfg.batch_size * dist.world_size
    total_steps = cfg.total_steps(data.num_rows, dist.world_size)
    optim = group_of(cfg, OptimOpts)
    optimizer = make_optimizer(model, optim, device)
    # With FSDP the mixed-precision policy casts parameters instead of autocast.
    autocast = (torch.autocast(device.type, dtype=DTYPES[cfg.autocast])
                if cfg.autocast and not cfg.fsdp else nullcontext())
    return _Session(cfg=cfg, spec=spec, dist=dist, data=data, manifest=manifest, run=run, run_dir=run_dir,
                    model=model, scorer=scorer, tokenizer=tokenizer, optimizer=optimizer,
                    scheduler=make_scheduler(optimizer, optim, total_steps), totals=sinks[0],
                    device=device, autocast=autocast,
                    pad_id=int(manifest.spec["tokenizer"]["pad_token_id"]), global_batch=global_batch,
                    total_steps=total_steps, eval_set=eval_set, t_start=t_start,
                    seq_lens=[data.seq_len(i) for i in range(data.num_rows)] if cfg.group_by_length else None,
                    metrics_log=MetricsLog(run_dir / checkpoint.METRICS, enabled=dist.is_main, sinks=sinks))


def _resumed_state(s: _Session, plan) -> TrainState:
    """The state to train from: the checkpoint's on resume (the metrics log cut back to its step),
    else step 0."""
    state = TrainState()
    if plan.resume_from:
        state = checkpoint_state.restore(plan.resume_state, s.model, s.optimizer, s.scheduler, s.cfg.fsdp)
        log(f"resuming from {plan.resume_from[1]} (step {state.step} of {s.total_steps})")
    elif s.cfg.resume:
        log("nothing to resume yet; starting from step 0")
    s.metrics_log.truncate_after(state.step)
    if s.run is not None:
        s.run.prune(s.cfg.save_total_limit)  # a --save-total-limit lowered on resume applies at once
    return state


def _save(s: _Session, state: TrainState) -> None:
    """Checkpoint the state (once per step). Under FSDP every rank writes its own shards (DCP);
    otherwise rank 0 writes the whole model."""
    if state.last_saved == state.step:
        return
    checkpoint.save_step(s.run, s.dist, state.step, s.model, s.tokenizer, s.optimizer, s.scheduler,
                         state.record(s.global_batch, s.dist.world_size), s.cfg.fsdp,
                         s.cfg.save_total_limit)
    state.last_saved = state.step


def _evaluate(s: _Session) -> dict:
    """eval_* metrics over the whole eval cache with the current weights, through the same path as
    `dpo eval` (so periodic eval and `dpo eval` of the saved checkpoint agree)."""
    s.model.eval()
    manifest, data = s.eval_set
    metrics, _, _ = evaluate_policy(s.scorer, data, manifest, s.spec, s.pad_id, s.device, dist=s.dist)
    s.model.train()
    return rename_for_eval(metrics)


def _final_eval(s: _Session, step: int) -> dict:
    """The end-of-run eval (for the summary); logged unless this step's periodic eval was."""
    if s.eval_set is None or s.last_eval[0] == step:
        return s.last_eval[1] if s.eval_set is not None else {}
    logged = s.metrics_log.last_record_with("eval_loss")
    # A run resumed after it had finished logged this step's eval already: not written twice.
    if s.dist.broadcast_object(logged.get("step") == step):
        return {k: v for k, v in logged.items() if k != "step"}
    evals = _evaluate(s)
    if not (s.cfg.eval_every and step % s.cfg.eval_every == 0):
        s.metrics_log.write({"step": step, **evals})
    return evals
