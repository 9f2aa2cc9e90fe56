"""Stage 1: score every pair with the frozen reference model once and write the Parquet cache.

Flow: read + validate all rows -> tokenize all rows (TRL conventions) -> plan fixed shards of
input rows -> for each unfinished shard: length-sorted batches -> reference forward (inference
mode, completion-only LM head) -> write shard atomically -> commit manifest.

Assumptions:
* Shards are fixed slices of the input (rows_per_shard rows each) decided before any scoring, so a
  rerun with the same arguments finds the same shards and skips the ones already listed.
* Bad input (including, with --strict, any row that would be dropped) is reported before the
  output folder is touched. Without --strict, a row dpocli cannot score as its data means (see
  tokenization.py) is skipped and counted by reason, per shard, like a prompt that fills
  --max-length; the manifest and the summary report the counts.
* Values do not depend on batch size or row order beyond fp32 rounding (~1e-6 per token). Still,
  `dpo eval` replays the batching to reproduce the cache exactly, so it is recorded exactly: the
  layout (shards, packing, prefix sharing) in the spec, the budget per shard (see `Batching`).
"""

from __future__ import annotations

import math
import os
import platform
import resource
import time
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from dpocli import __version__
from dpocli.cache import folder as cache_folder
from dpocli.cache import store as cache
from dpocli.data.examples import read_examples
from dpocli.data.hub import Snapshot, resolve_dataset
from dpocli.data.tokenization import (
    DROP_PROMPT_TOO_LONG,
    Dropped,
    check_field_sizes,
    pad_token_id,
    tokenize_pair,
    tokenizer_fingerprint,
)
from dpocli.errors import DpocliError, Interrupted, RunFailure, out_of_memory_types
from dpocli.io import ownership as outputs
from dpocli.io.atomic import atomic_dir, atomic_write_text
from dpocli.io.console import ProgressBar, log, sigterm_as_interrupt, warn
from dpocli.io.folder_lock import FolderLock
from dpocli.model import distributed, vision
from dpocli.model.attention import describe as describe_attention
from dpocli.model.batching import make_batch, plan_reference_batches
from dpocli.model.devices import resolve_device
from dpocli.model.load import (
    has_vision_tower,
    load_causal_lm,
    load_causal_lm_sharded,
    load_tokenizer,
    resolve_model_dir,
    weights_fingerprint,
)
from dpocli.model.logprobs import CompletionScorer, sequence_logps
from dpocli.precompute.config import PrecomputeConfig
from dpocli.scoring.vlm import VisionBatch, image_columns, image_stats

CONVENTIONS = "trl-1.x"  # tokenization + log-prob conventions; see tokenization.py


def _resolved(path: str) -> str:
    """An existing local path made absolute; anything else (a hub id) as given."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def _input_files(read, dataset: Snapshot | None) -> list[dict]:
    """The files read, each with its fingerprint. A Hub dataset's files are named by their path
    inside the repo (the commit pins them), so the same snapshot in another HF cache folder, or on
    another machine, is the same input on resume."""
    if dataset is not None:
        return [{**asdict(f), "path": dataset.relative(Path(f.path))} for f in read.files]
    return [{**asdict(f), "path": _resolved(f.path)} for f in read.files]


def _build_spec(cfg: PrecomputeConfig, read, tokenizer, model_fp: dict,
                dataset: Snapshot | None = None, processor=None) -> dict:
    """Everything that changes the cached numbers or how `dpo eval` replays them, except the
    batch budget, which each shard records (so an out-of-memory run can resume with a smaller
    one). The layout is here although it moves values only at the ulp level: a rerun asking for
    another layout must be refused (or redone with --overwrite), never mixed into one cache."""
    return {
        "conventions": CONVENTIONS,
        # Local paths are stored resolved: `./data.jsonl` and `/abs/data.jsonl` are the same input
        # on resume, and `cache verify --rescore` finds the model from any working directory.
        "reference_model": {"path": _resolved(model_fp["path"]), "revision": model_fp["revision"],
                            "sha256": model_fp["sha256"],
                            **({"fingerprint": "sampled"} if model_fp["mode"] == "sampled" else {})},
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer),
                      "eos_token": tokenizer.eos_token, "pad_token_id": pad_token_id(tokenizer)},
        "max_length": cfg.max_length,
        "truncation": "keep_start",
        "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation or "default",
        "token_logps": cfg.token_logps,
        "batching": cfg.batching().layout(),
        "input": {
            "files": _input_files(read, dataset),
            # Only inputs with splits record one, so caches of plain files made before --split stay valid;
            # likewise the hub repo and subset only when there is one.
            **({"hub": {"repo_id": dataset.repo_id, "revision": dataset.revision}} if dataset else {}),
            **({"split": read.split} if read.split is not None else {}),
            **({"subset": cfg.subset} if cfg.subset is not None else {}),
            "columns": {"prompt": cfg.prompt_column, "chosen": cfg.chosen_column,
                        "rejected": cfg.rejected_column, "id": cfg.id_column},
            "drop_identical": cfg.drop_identical,
            "dropped_on_read": dict(read.dropped),
        },
        # Only vision-language caches have the key, so text caches and their fingerprints stay as they were.
        **({"vision": vision.vision_spec(processor)} if processor is not None else {}),
    }


def _score_shard(scorer, device, pairs, cfg, pad_id, bar, throughput, processor=None) -> dict:
    """Reference values for the (row, TokenizedPair) list of one shard, as cache columns in input order."""
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for _, p in pairs]
    chosen, rejected = [0.0] * len(pairs), [0.0] * len(pairs)
    chosen_tok, rejected_tok = [None] * len(pairs), [None] * len(pairs)
    batching = cfg.batching()
    for idxs in plan_reference_batches(lengths, batching):
        sel = [pairs[i][1] for i in idxs]
        batch = make_batch([p.prompt_ids for p in sel], [p.chosen_ids for p in sel],
                           [p.rejected_ids for p in sel], pad_id, batching.prefix_sharing,
                           batching.packing)
        if processor is not None:  # the pixel values of the batch's images (vlm_scoring.py)
            batch = VisionBatch(batch, vision.pixel_inputs(processor, [vision.pil_images(pairs[i][0])
                                                                      for i in idxs]))
        out = sequence_logps(scorer, batch.to(device), keep_token_logps=cfg.token_logps)
        # One copy to the host per batch, not one sync per value.
        batch_chosen, batch_rejected = out.chosen_logps.tolist(), out.rejected_logps.tolist()
        for j, i in enumerate(idxs):
            chosen[i], rejected[i] = batch_chosen[j], batch_rejected[j]
            if cfg.token_logps:
                chosen_tok[i] = out.chosen_token_logps[j].cpu().tolist()
                rejected_tok[i] = out.rejected_token_logps[j].cpu().tolist()
        bar.update(len(idxs), **{"tok/s": f"{throughput(batch.num_tokens):,.0f}"})
    examples = [ex for ex, _ in pairs]
    columns = {
        "id": [ex.id for ex in examples], "source_row": [ex.source_row for ex in examples],
        "prompt_ids": [p.prompt_ids for _, p in pairs], "chosen_ids": [p.chosen_ids for _, p in pairs],
        "rejected_ids": [p.rejected_ids for _, p in pairs],
        "chosen_len": [len(p.chosen_ids) for _, p in pairs],
        "rejected_len": [len(p.rejected_ids) for _, p in pairs],
        "ref_chosen_logps": chosen, "ref_rejected_logps": rejected,
        "ref_chosen_token_logps": chosen_tok, "ref_rejected_token_logps": rejected_tok,
        **(image_columns(examples) if processor is not None else {}),
    }
    return columns


def _write_shard(out: Path, index: int, pairs, cfg: PrecomputeConfig, spec: dict, scorer, device,
                 pad_id: int, bar, throughput, processor=None) -> dict:
    """Score and write shard `index`; its manifest entry, plus the completion tokens scored."""
    rows = pairs[index * cfg.rows_per_shard:(index + 1) * cfg.rows_per_shard]
    keep = [(ex, tok) for ex, tok in rows if not isinstance(tok, Dropped)]
    dropped: dict[str, int] = {}
    for _, tok in rows:
        if isinstance(tok, Dropped):
            dropped[tok.reason] = dropped.get(tok.reason, 0) + 1
    bar.update(len(rows) - len(keep))
    try:
        columns = _score_shard(scorer, device, keep, cfg, pad_id, bar, throughput, processor)
    except out_of_memory_types():
        raise RunFailure(f"out of memory scoring shard {index} (finished shards are kept)",
                         hint="rerun with a smaller --max-tokens or --batch-size; it resumes") from None
    entry = cache.write_shard(out, index, columns, cfg.token_logps, spec)
    entry["dropped"] = dropped
    entry["budget"] = cfg.batching().budget()  # eval replays each shard's own budget
    entry["tokens"] = sum(len(t.chosen_ids) + len(t.rejected_ids) for _, t in keep)
    if processor is not None:
        entry.update(image_stats([ex for ex, _ in keep]))
    return entry


def _load_reference(cfg: PrecomputeConfig, device):
    """(model, scorer). With --fsdp the reference is built on meta, sharded in small forward-only
    units (`distributed.shard_for_inference`) and each rank loads only its part, so no rank holds
    the whole model, nor more than about one linear layer of it gathered."""
    if not cfg.fsdp:
        model = load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, revision=cfg.model_revision,
                               attn_implementation=cfg.attn_implementation,
                               trust_remote_code=cfg.trust_remote_code)
        return model, CompletionScorer(model, chunk_size=cfg.chunk_size, compile=cfg.compile)
    return load_causal_lm_sharded(
        cfg.model, lambda m: distributed.shard_for_inference(
            m, CompletionScorer(m, chunk_size=cfg.chunk_size, compile=cfg.compile)),
        dtype=cfg.dtype, device=device, attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code, revision=cfg.model_revision)


def _num_forwards(pairs, index: int | None, cfg: PrecomputeConfig) -> int:
    """How many reference forwards shard `index` takes (the plan `_score_shard` follows)."""
    if index is None:
        return 0
    rows = pairs[index * cfg.rows_per_shard:(index + 1) * cfg.rows_per_shard]
    lengths = [(len(t.prompt_ids), len(t.chosen_ids), len(t.rejected_ids))
               for _, t in rows if not isinstance(t, Dropped)]
    return len(plan_reference_batches(lengths, cfg.batching()))


def _idle_forwards(scorer, device, pad_id: int, cfg: PrecomputeConfig, count: int) -> None:
    """Under FSDP every forward is a collective (each layer is all-gathered), so every rank runs
    as many forwards per round as the busiest one: a rank whose shard took fewer (or that had
    none this round) runs `count` one-token forwards whose results are dropped."""
    if count <= 0:
        return
    batching = cfg.batching()
    idle = make_batch([[pad_id]], [[pad_id]], [[pad_id]], pad_id, batching.prefix_sharing,
                      batching.packing).to(device)
    for _ in range(count):
        sequence_logps(scorer, idle)


class _Throughput:
    """Tokens/s over the run, shown in the progress bar."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def __call__(self, tokens: int) -> float:
        self.tokens += tokens
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


RESOLVED_TOML = "config.resolved.toml"


def _tokenize_rows(cfg: PrecomputeConfig, read, tokenizer, processor=None) -> list[tuple]:
    """(example, TokenizedPair | Dropped) for every row read. A dropped row is counted by reason
    (one warning per reason, naming the first row); with --strict it is the error instead. Refuses
    when no row is left. With a vision-language `processor`, rows are tokenized as TRL's VLM
    collator does (vision.py)."""
    pairs, first_error = [], {}
    columns = {"prompt": cfg.prompt_column, "chosen": cfg.chosen_column, "rejected": cfg.rejected_column}
    for ex in read.examples:
        check_field_sizes(ex, cfg.max_field_bytes, columns)
        tok = (vision.tokenize_vision_pair(ex, processor, cfg.max_length) if processor is not None
               else tokenize_pair(ex, tokenizer, cfg.max_length))
        if isinstance(tok, Dropped):
            error = tok.error or DpocliError(
                f"would be dropped ({tok.reason}: the prompt alone has at least --max-length "
                f"{cfg.max_length} tokens)", file=ex.file, row=ex.row, field=cfg.prompt_column,
                hint="raise --max-length or drop --strict")
            if cfg.strict:
                raise error
            first_error.setdefault(tok.reason, error)
        pairs.append((ex, tok))
    counts = Counter(t.reason for _, t in pairs if isinstance(t, Dropped))
    for reason, n in counts.items():
        warn(f"skipped {n} row(s), {reason} (first: {first_error[reason]}); they are counted in the "
             "manifest, and --strict makes them errors")
    shrunk = sum(1 for _, t in pairs if not isinstance(t, Dropped) and t.prompt_shrunk)
    if shrunk:
        warn(f"{shrunk} row(s): the tokenized prompt is not a prefix of prompt+completion (BPE merged "
             "across the boundary); their prompt was shortened to the common prefix, as TRL does")
    if not any(not isinstance(t, Dropped) for _, t in pairs):
        reasons = ", ".join(f"{reason} {n}" for reason, n in counts.items())
        first = next(iter(first_error.values()))
        raise DpocliError(f"no rows left after tokenization: all {len(pairs)} rows were dropped ({reasons})",
                          file=cfg.input, field="--max-length" if DROP_PROMPT_TOO_LONG in counts else None,
                          hint=f"the first: {first}")
    return pairs


def _read_input(cfg: PrecomputeConfig, source, model_dir) -> tuple:
    """(rows read, tokenizer, processor or None). A vision-language reference and rows with an
    image column take TRL's VLM path (vision.py); everything else the text path."""
    if has_vision_tower(model_dir) and vision.has_image_column(source):
        read, processor = vision.read_vision_input(cfg, source, model_dir)
        tokenizer = processor.tokenizer
    else:
        read, processor = read_examples(
            source, prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
            rejected_column=cfg.rejected_column, id_column=cfg.id_column, drop_identical=cfg.drop_identical,
            split=cfg.split, subset=cfg.subset, strict=cfg.strict), None
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                   revision=cfg.model_revision)
    for line in read.warnings:
        warn(line)
    return read, tokenizer, processor


def run_precompute(cfg: PrecomputeConfig, resolved_toml: str | None = None) -> dict:
    """Build (or resume, or confirm) the cache described by `cfg`; return the summary."""
    with FolderLock(cfg.out, "precompute-ref") as lock:  # one writer per cache: rank 0 holds it
        return _run_precompute(cfg, resolved_toml, lock)


def _run_precompute(cfg: PrecomputeConfig, resolved_toml: str | None, lock: FolderLock) -> dict:
    t0 = time.perf_counter()
    dist = distributed.current()
    cfg.check()
    source, dataset = resolve_dataset(cfg.input, cfg.revision)
    if dataset is not None:
        log(f"dataset {dataset.repo_id} at {dataset.revision[:12]} from {source}")
    model_dir = resolve_model_dir(cfg.model, cfg.model_revision)
    cfg = cfg.with_layout(model_dir)
    read, tokenizer, processor = _read_input(cfg, source, model_dir)
    pairs = _tokenize_rows(cfg, read, tokenizer, processor)
    model_fp = weights_fingerprint(cfg.model, cfg.model_revision, mode=cfg.weights_fingerprint)
    spec = _build_spec(cfg, read, tokenizer, model_fp, dataset, processor)
    out = Path(cfg.out)
    # Write access is checked only once the cache turns out not to be finished: a finished one
    # on a read-only disk is a no-op, and takes no lock (it cannot hold a lock file).
    outputs.check_output_location(out, {"the input": source, "--model": model_dir}, writable=False)

    # Rank 0 alone inspects the folder; the others get its verdict (or its error, so that no
    # rank is left waiting in a collective when rank 0 refuses). Nothing is written yet.
    plan = dist.on_main_then_broadcast(lambda: _inspect_locked(out, spec, cfg.overwrite, lock))
    if plan.complete:
        log(f"[green]already complete[/green]: {out} matches these arguments; nothing to do")
        return _summary(cfg, plan.resume, "already_complete", time.perf_counter() - t0, 0)
    outputs.check_creatable(out)

    planned = math.ceil(len(pairs) / cfg.rows_per_shard)
    manifest = plan.resume or cache.Manifest(spec=spec, planned_shards=planned, rows_read=read.rows_read)
    done = {s["index"] for s in manifest.shards}
    todo = [i for i in range(planned) if i not in done and i % dist.world_size == dist.rank]

    # Device and model come before the folder is touched, so a bad --device or model leaves the
    # folder (and any cache in it) exactly as it was.
    device = dist.device_for(resolve_device(cfg.device))
    model, scorer = _load_reference(cfg, device)
    dist.on_main_then_broadcast(lambda: cache_folder.claim_out(out, plan, manifest, lock))
    if done:
        log(f"resuming: {len(done)} of {planned} shards already done")
    _warn_positions(model, pairs)
    tokens_scored = _score_shards(out, todo, pairs, cfg, spec, scorer, device, pad_token_id(tokenizer),
                                  processor, manifest, dist)

    if dist.is_main:
        if resolved_toml:
            atomic_write_text(out / RESOLVED_TOML, resolved_toml)
        _finalize(out, manifest, processor or tokenizer, model_fp, cfg, pairs)
    dist.barrier()
    elapsed = time.perf_counter() - t0
    summary = _summary(cfg, manifest, "resumed" if done else "complete", elapsed, tokens_scored)
    # The largest per-rank peak (a collective): with --fsdp it is what sharding saves.
    rss_kb = dist.max_over_ranks(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return {**summary, "peak_rss_mb": round(rss_kb / 1024, 1)}


def _warn_positions(model, pairs) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids))
                  for _, t in pairs if not isinstance(t, Dropped))
    if positions and longest > positions:
        warn(f"the longest sequence has {longest} tokens but the model was configured for "
             f"{positions} positions; lower --max-length unless the model extrapolates")


def _score_shards(out: Path, todo: list[int], pairs, cfg: PrecomputeConfig, spec: dict, scorer, device,
                  pad_id: int, processor, manifest: cache.Manifest, dist) -> int:
    """Score and write this rank's shards `todo`, committing the manifest after each round; returns
    the tokens scored. Every rank takes part in every gather, also after its own shards run out
    (None entries), so rank 0 can commit the manifest after each round of shards."""
    rows_todo = sum(min(cfg.rows_per_shard, len(pairs) - i * cfg.rows_per_shard) for i in todo)
    tokens_scored = 0
    rounds = dist.max_over_ranks(len(todo))
    try:
        with sigterm_as_interrupt(), ProgressBar("precompute-ref", rows_todo) as bar, \
                torch.inference_mode():
            throughput = _Throughput()
            for round_ in range(rounds):
                entry = None
                mine = todo[round_] if round_ < len(todo) else None
                # Under FSDP every forward is a collective: agree on this round's count first.
                forwards = _num_forwards(pairs, mine, cfg)
                busiest = dist.max_over_ranks(forwards) if cfg.fsdp else forwards
                if mine is not None:
                    entry = _write_shard(out, mine, pairs, cfg, spec, scorer, device,
                                         pad_id, bar, throughput, processor)
                    tokens_scored += entry.pop("tokens")
                _idle_forwards(scorer, device, pad_id, cfg, busiest - forwards)
                manifest.shards += [e for e in dist.all_gather_object(entry) if e is not None]
                manifest.shards.sort(key=lambda e: e["index"])
                if dist.is_main:
                    cache.commit_manifest(out, manifest)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {len(manifest.shards)} of {manifest.planned_shards} shards are "
                          f"saved in {out}", hint="rerun the same command to resume: finished shards "
                          "are kept") from None
    return tokens_scored


def _finalize(out: Path, manifest: cache.Manifest, tokenizer, model_fp: dict,
              cfg: PrecomputeConfig, pairs: list[tuple]) -> None:
    """Length statistics, provenance and the tokenizer; then the manifest is marked complete.
    The statistics come from the tokenized rows (every shard holds exactly the kept ones, also
    after a resume: same spec, same tokenization), so no shard is read back."""
    import transformers
    kept = [t for _, t in pairs if not isinstance(t, Dropped)]
    manifest.length_stats = cache.length_stats([len(t.prompt_ids) for t in kept],
                                               [len(t.chosen_ids) for t in kept],
                                               [len(t.rejected_ids) for t in kept])
    manifest.created = {
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "dpocli": __version__,
        "reference_model_files": model_fp["files"],
        "attention_kernel": describe_attention(cfg.packing, cfg.attn_implementation),
    }
    # (a vision-language cache keeps the whole processor here: train and eval rebuild pixels with it)
    tok_dir = out / cache.TOKENIZER_DIR  # replaced whole if present: it is ours (cache_folder.CACHE_NAMES)
    with atomic_dir(tok_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    # Hashed after the rename, from the files as they now lie: what train/eval/verify check.
    manifest.tokenizer_files = cache.tokenizer_file_hashes(tok_dir)
    manifest.complete = True
    cache.commit_manifest(out, manifest)


def _inspect_locked(out: Path, spec: dict, overwrite: bool, lock: FolderLock) -> cache_folder.OutPlan:
    """`inspect_out` under the folder's lock when it is a dpocli cache that can hold one (writable):
    a finished cache needs no lock, nor write access. Any other folder gets no lock file before
    the claim, which locks it (`cache_folder.claim_out`)."""
    if (out / cache.MANIFEST_NAME).is_file() and os.access(out, os.W_OK | os.X_OK):
        lock.acquire()
    return cache_folder.inspect_out(out, spec, overwrite)


def _summary(cfg: PrecomputeConfig, manifest: cache.Manifest, status: str, seconds: float,
             tokens: int) -> dict:
    return {
        "command": "precompute-ref", "dpocli_version": __version__, "status": status,
        "cache": str(cfg.out), "spec_fingerprint": manifest.spec_fingerprint,
        "rows_read": manifest.rows_read, "rows_written": manifest.rows_written,
        "rows_dropped": manifest.dropped, "shards": len(manifest.shards),
        "completion_tokens_scored": tokens, "seconds": round(seconds, 3),
        "completion_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "length_stats": manifest.length_stats,
    }
