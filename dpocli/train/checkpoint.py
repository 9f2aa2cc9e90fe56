"""The run folder and its checkpoints: what a run wrote, and the state needed to resume exactly.

A run folder is dpocli's only if it holds `run_record.json`, the run record. The record lists
every top-level entry the run created (written to the record *before* the entry is created),
so `--overwrite`, pruning and cleanup delete only what the record proves dpocli wrote
(outputs.py states the rule).

A checkpoint is `RUN_DIR/checkpoint-<step>/`, in one of two formats chosen by the run's mode:
* DDP and one process: config.json + model.safetensors + tokenizer files (loadable with
  `from_pretrained`), `trainer_state.json` (step, data position) and `optimizer.pt` (optimizer,
  scheduler and RNG states).
* `--fsdp`: config.json + tokenizer files, `trainer_state.json`, `dcp/` (model and optimizer
  state written by every rank through torch.distributed.checkpoint, reshardable to another world
  size) and `trainer_state.pt` (scheduler and RNG states). No rank ever holds the whole optimizer.
  `dpo eval` and `from_pretrained`-style loading in dpocli read it (modeling.py); for other tools
  the final model (RUN_DIR itself) is the plain HF folder.
A LoRA checkpoint holds the adapter (adapter_config.json + adapter_model.safetensors, as peft
writes it) instead of the model, in both formats: with `--fsdp` the adapter is gathered to rank 0
for those files, and `dcp/` holds only the adapter's weights and optimizer state (the frozen base
is the base model's, loaded from `--model`).
It is written as a temporary folder and renamed, so a checkpoint folder either exists complete or
not at all; leftovers of a crash (`checkpoint-N.dpocli-tmpdir-<random>`, atomic.py) are ignored and
removed by the next save. Every checkpoint, the final model and `merged/` hold `checksums.json`
(folder_checksums.py), written before the folder counts as complete; `--resume` verifies the
newest checkpoint and checks its state (checkpoint_state.py) before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpocli import __version__
from dpocli.errors import DpocliError
from dpocli.io import folder_checksums
from dpocli.io import ownership as outputs
from dpocli.io.atomic import (
    as_write_failure,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    commit_dir,
    make_temporary_dir,
    temporaries_of,
)
from dpocli.io.folder_lock import FolderLock
from dpocli.io.state_files import StateFile
from dpocli.model import lora, sharding
from dpocli.model.load import quiet_transformers
from dpocli.train.checkpoint_state import (
    SHARDED_STATE_PT,
    STATE_JSON,
    STATE_PT,
    CheckpointState,
    read_checkpoint,
    rng_state,
)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RUN_RECORD = "run_record.json"
RUN_CONFIG = "run_config.json"
RESOLVED_TOML = "config.resolved.toml"
METRICS = "metrics.jsonl"
FINAL_STAGING = "final-model"  # the final model is written here first (as a temporary), then moved up
RECORD_FORMAT = "dpocli-run"
# Fields that may change between an interrupted run and its --resume.
# batch_size may change as long as batch_size x ranks (the global batch) stays the same.
# layout: its name; the two flags it stands for (packing, prefix_sharing) are compared instead.
RESUME_FREE = {"resume", "overwrite", "save_every", "save_total_limit", "eval_every", "batch_size",
               "report_to", "attention_kernel", "layout"}


@dataclass
class RunPlan:
    """How `--out` will be used, decided by looking only (`inspect_run_dir`)."""

    path: Path
    resume_from: tuple[int, Path] | None = None  # (step, checkpoint folder)
    record: dict | None = None  # the existing record when resuming
    remove: list[Path] = field(default_factory=list)  # ours: cleared before the run starts
    resume_state: CheckpointState | None = None  # the newest checkpoint's state, read and checked


def _read_record(path: Path) -> dict | None:
    """The run record, a dpocli 0.1 run's equivalent (run_config.json only), or None."""
    record_path = path / RUN_RECORD
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise DpocliError(f"cannot be read ({err}), so dpocli cannot prove it wrote this folder",
                              file=record_path, hint="choose another --out") from None
        if not (isinstance(record, dict) and record.get("format") == RECORD_FORMAT
                and isinstance(record.get("files"), list)):
            raise DpocliError("is not a dpocli run record", file=record_path,
                              hint="choose another --out")
        _check_record_fields(record, record_path)
        return record
    if (path / RUN_CONFIG).is_file():  # written by dpocli 0.1, which kept no record
        try:
            config = json.loads((path / RUN_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if isinstance(config, dict) and {"cache", "model", "out", "beta"} <= set(config):
            legacy = [RUN_CONFIG, RESOLVED_TOML, METRICS] + [p.name for _, p in list_checkpoints(path)]
            return {"format": RECORD_FORMAT, "files": legacy, "legacy": True}
    return None


def _check_record_fields(record: dict, where: Path) -> None:
    """Every name the record lists is a plain entry of the run folder (never `..`, a path or
    anything that leaves it: these names are what --overwrite deletes), and `cache` an object."""
    for name in record["files"]:
        if not (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
                and "\\" not in name and "\0" not in name):
            raise DpocliError(f"lists {name!r}, which is not the name of an entry inside the run folder",
                              file=where, field="files", hint="choose another --out")
    if not isinstance(record.get("cache", {}), dict):
        raise DpocliError("is not an object", file=where, field="cache",
                          hint="choose another --out")


def _survey_run(path: Path, record: dict) -> outputs.Survey:
    names = set(record["files"]) | {RUN_RECORD}
    return outputs.survey(path, lambda name: name in names,
                          lambda name: name in names or name == FINAL_STAGING
                          or bool(CHECKPOINT_RE.match(name)))


def inspect_run_dir(path: Path, config: dict, cache_identity: dict, *, resume: bool,
                    overwrite: bool, defaults: dict | None = None, total_steps: int = 0,
                    global_batch: int = 0) -> RunPlan:
    """Decide how to use RUN_DIR without touching it; refuse what would clobber anything that is
    not this run's. Every rank may call it (it only reads)."""
    if path.exists() and not path.is_dir():
        raise DpocliError("exists and is not a folder", file=path)
    if not path.exists() or not outputs.entries(path):
        return RunPlan(path)
    record = _read_record(path)
    if record is None:
        first = outputs.entries(path)[0].name
        raise DpocliError(f"is not empty (holds {first!r}) and is not a dpocli run; dpocli never "
                          "writes into, clears or deletes such a folder", file=path,
                          hint="choose a new --out folder")
    found = _survey_run(path, record)
    if resume:
        found.refuse_foreign("is a dpocli run but")
        _check_resumable(path, config, cache_identity, record, defaults or {})
        found_ckpts = list_checkpoints(path)
        newest = found_ckpts[-1] if found_ckpts else None
        saved = read_checkpoint(*newest, total_steps, global_batch) if newest else None
        return RunPlan(path, newest, record, found.temporaries, saved)
    if not overwrite:
        raise DpocliError("already holds a dpocli run", file=path,
                          hint="pass --resume to continue it, --overwrite to start over, or choose "
                               "another --out")
    found.refuse_foreign("is a dpocli run but")
    return RunPlan(path, remove=found.owned + found.temporaries)


def plan_run(dist, lock: FolderLock, cfg, config: dict, cache_identity: dict, num_rows: int) -> RunPlan:
    """`inspect_run_dir` for a TrainConfig `cfg` (every rank), with the folder locked first by
    rank 0 when it is a dpocli run; any other folder (fresh, empty, or refused as foreign) gets no
    lock file before the claim, which locks it (`RunDir.claim`)."""
    run_dir = Path(cfg.out)
    ours = (run_dir / RUN_RECORD).is_file() or (run_dir / RUN_CONFIG).is_file()
    dist.on_main_then_broadcast(lambda: lock.acquire() if ours else None)
    return inspect_run_dir(run_dir, config, cache_identity, resume=cfg.resume, overwrite=cfg.overwrite,
                           defaults={f.name: f.default for f in dataclasses.fields(cfg)},
                           total_steps=cfg.total_steps(num_rows, dist.world_size),
                           global_batch=cfg.batch_size * dist.world_size)


def started_layout(path: Path) -> tuple[bool, bool] | None:
    """(packing, prefix_sharing) that the run in `path` was started with (False for a run made
    before the flags existed), or None when `path` holds no readable run config. Looks only."""
    try:
        saved = json.loads((path / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    return bool(saved.get("packing", False)), bool(saved.get("prefix_sharing", False))


def _check_resumable(path: Path, config: dict, cache_identity: dict, record: dict,
                     defaults: dict) -> None:
    saved_path = path / RUN_CONFIG
    saved = StateFile.read_json(saved_path, hint="the run's settings are damaged; start a new run "
                                                 "from a checkpoint: --model RUN_DIR/checkpoint-N").data
    # An option added after the run started has its default in that run.
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    for key in sorted(set(saved) | set(config)):
        if key not in RESUME_FREE and saved.get(key) != config.get(key):
            raise DpocliError(f"was started with {key}={saved.get(key)!r}, this run has "
                              f"{config.get(key)!r}", file=saved_path, field=key,
                              hint="resume with the original arguments, or start a new run from a "
                                   "checkpoint: --model RUN_DIR/checkpoint-N --out NEW_DIR")
    for key, value in record.get("cache", {}).items():
        if cache_identity.get(key) != value:
            raise DpocliError(f"the cache {config.get('cache')} was rebuilt since this run started "
                              f"({key} differs)", file=path / RUN_RECORD, field=key,
                              hint="resume with the cache the run started with, or start a new run")


class RunDir:
    """A claimed run folder. Only rank 0 makes one; it adds each entry to the record first."""

    def __init__(self, path: Path, record: dict, created_folder: bool, lock: FolderLock | None = None):
        self.path = path
        self.record = record
        self.created_folder = created_folder
        self.lock = lock

    @classmethod
    def claim(cls, plan: RunPlan, config: dict, cache_identity: dict, resolved_toml: str | None,
              extra_files: tuple[str, ...] = (), lock: FolderLock | None = None) -> "RunDir":
        """Clear what the plan proved to be ours, then write the record, run_config.json and the
        resolved TOML. Called only after every check and the model load succeeded. `lock` (taken
        before the inspection when the folder existed) is taken here otherwise."""
        outputs.remove_owned(plan.remove)
        created = outputs.ensure_folder(plan.path)
        if lock is not None:
            lock.acquire_at_claim()
        if plan.record is not None and not plan.record.get("legacy"):
            record = plan.record
        else:
            record = {"format": RECORD_FORMAT, "dpocli_version": __version__,
                      "files": list((plan.record or {}).get("files", [])), "cache": cache_identity}
        run = cls(plan.path, record, created, lock)
        run.add(RUN_CONFIG, RESOLVED_TOML, METRICS, *extra_files)
        if plan.record is None:
            atomic_write_json(plan.path / RUN_CONFIG, config)
            if resolved_toml:
                atomic_write_text(plan.path / RESOLVED_TOML, resolved_toml)
        return run

    def add(self, *names: str) -> None:
        """List entries in the record before they are created."""
        new = [n for n in names if n not in self.record["files"]]
        if new:
            self.record["files"] += new
            atomic_write_json(self.path / RUN_RECORD, self.record)

    def discard(self, *names: str) -> None:
        self.record["files"] = [n for n in self.record["files"] if n not in names]
        atomic_write_json(self.path / RUN_RECORD, self.record)

    def abandon(self) -> None:
        """A run that failed before its first step leaves nothing behind: the corrected rerun
        must not find a half-started run in its way."""
        outputs.remove_owned([self.path / n for n in self.record["files"] + [RUN_RECORD]
                              if (self.path / n).exists()])
        if self.lock is not None:
            self.lock.release()  # its file would keep the folder from being removed
        if self.created_folder:
            outputs.remove_folder_if_empty(self.path)

    def save_checkpoint(self, step: int, model, tokenizer, optimizer_state: dict, scheduler,
                        trainer_state: dict) -> Path:
        self.add(f"checkpoint-{step}")
        return save_checkpoint(self.path, step, model, tokenizer, optimizer_state, scheduler,
                               trainer_state)

    def prune(self, keep: int | None) -> None:
        """Delete the oldest of this run's checkpoints beyond `keep` (None keeps all)."""
        if not keep:
            return
        listed = set(self.record["files"])
        for _, path in [c for c in list_checkpoints(self.path) if c[1].name in listed][:-keep]:
            outputs.remove_owned([path])
            self.discard(path.name)

    def save_final(self, write) -> None:
        """The final model, as a plain HF folder = RUN_DIR itself, written by `write(folder)` in a
        staging folder first; its files are recorded, then moved up with config.json last, so a
        failure never leaves a config.json that looks like a finished model without its weights."""
        staging = make_temporary_dir(self.path / FINAL_STAGING)
        try:
            write(staging)
            folder_checksums.write(staging)  # moved up before config.json (below)
            names = sorted(os.listdir(staging), key=lambda n: n == "config.json")
            for name in names:
                target = self.path / name
                if (target.exists() and name not in self.record["files"]) or target.is_dir():
                    raise DpocliError(f"would replace {name!r}, which dpocli did not write",
                                      file=self.path)
            self.add(*names)
            for name in names:
                os.replace(staging / name, self.path / name)
        except Exception as err:
            failure = as_write_failure(self.path, err)
            if failure is err:
                raise
            raise failure from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def save_merged(self, model, tokenizer) -> None:
        self.add("merged")
        with atomic_dir(self.path / "merged") as tmp:
            save_model_folder(tmp, model, tokenizer)
            folder_checksums.write(tmp)


def save_model_folder(folder: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """HF format, safetensors, tokenizer included (a model whole in this process, or a sharded
    LoRA model whose adapter `state_dict` was gathered: peft then writes the adapter from it)."""
    quiet_transformers()
    model.save_pretrained(folder, safe_serialization=True,
                          **({"state_dict": state_dict} if state_dict is not None else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_config_files(folder: Path, model, tokenizer) -> None:
    """config.json, generation_config.json and the tokenizer: everything of an HF folder but the
    weights (small; written by rank 0 alone)."""
    quiet_transformers()
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_final_model(run: RunDir | None, dist, model, tokenizer, sharded: bool) -> None:
    """The final HF folder. Under FSDP every rank takes part (one all-gather per parameter, see
    sharding.stream_weights) and rank 0 writes; a write failure reaches every rank."""
    if not sharded:
        if run is not None:
            run.save_final(lambda folder: save_model_folder(folder, model, tokenizer))
        return
    if lora.is_adapter_model(model):  # the adapter alone, as one process writes it
        adapter = sharding.gather_trainable(model)
        dist.collective_then_raise(lambda: run.save_final(
            lambda folder: save_model_folder(folder, model, tokenizer, adapter)) if run is not None else None)
        return

    def write(folder: Path) -> None:
        sharding.stream_weights(folder, model)
        save_config_files(folder, model, tokenizer)
    dist.collective_then_raise(lambda: run.save_final(write) if run is not None
                               else sharding.stream_weights(None, model))


def save_step(run: RunDir | None, dist, step: int, model, tokenizer, optimizer, scheduler,
              trainer_state: dict, sharded: bool, keep: int | None) -> None:
    """Checkpoint `step` (every rank calls; rank 0 alone holds `run`), then prune to `keep`."""
    if sharded:
        _save_sharded(run, dist, step, model, tokenizer, optimizer, scheduler, trainer_state)
    elif run is not None:
        run.save_checkpoint(step, model, tokenizer, optimizer.state_dict(), scheduler, trainer_state)
    if run is not None:
        run.prune(keep)
    dist.barrier()


def _save_sharded(run: RunDir | None, dist, step: int, model, tokenizer, optimizer, scheduler,
                  trainer_state: dict) -> None:
    """A DCP checkpoint: rank 0 records the name and makes the temporary folder, every rank writes
    its shards into it, rank 0 adds the small files and renames it (atomic as `atomic_dir`)."""
    final = (run.path if run is not None else Path()) / f"checkpoint-{step}"

    def start() -> str:
        run.add(final.name)  # in the record before it exists
        for stale in temporaries_of(run.path, final.name):
            shutil.rmtree(stale, ignore_errors=True)
        return str(make_temporary_dir(final))
    tmp = Path(dist.on_main_then_broadcast(start))

    adapter_only = lora.is_adapter_model(model)

    def write_shards() -> None:
        try:
            sharding.save_dcp(tmp / sharding.DCP_DIR, model, optimizer, trainable_only=adapter_only)
        except Exception as err:
            raise as_write_failure(final, err) from None
    dist.collective_then_raise(write_shards)
    adapter = sharding.gather_trainable(model) if adapter_only else None  # every rank: a collective

    def finish() -> None:
        try:
            if adapter_only:  # the adapter files a LoRA checkpoint has in one process too
                save_model_folder(tmp, model, tokenizer, adapter)
            else:
                save_config_files(tmp, model, tokenizer)
            torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / SHARDED_STATE_PT)
            atomic_write_json(tmp / STATE_JSON, trainer_state)
            folder_checksums.write(tmp)  # every rank's dcp/ shards included: before the commit
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise as_write_failure(final, err) from None
        commit_dir(tmp, final)
    dist.on_main_then_broadcast(finish)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer_state: dict, scheduler,
                    trainer_state: dict) -> Path:
    """Write checkpoint-<step> (the whole-model format) atomically; returns its path."""
    final = run_dir / f"checkpoint-{step}"
    for stale in temporaries_of(run_dir, final.name):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(final) as tmp:
        save_model_folder(tmp, model, tokenizer)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, tmp / STATE_PT)
        atomic_write_json(tmp / STATE_JSON, trainer_state)
        folder_checksums.write(tmp)  # before the rename: a complete checkpoint has its record
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints, oldest first. Temporary folders of interrupted saves are skipped; a
    `checkpoint-N` folder is complete by construction (renamed into place), so one with a file
    missing is damaged and refused when read (`read_checkpoint`), never silently passed over."""
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)
