"""The folder `dpo precompute-ref --out` writes: decide, by looking only, whether it is a fresh
folder, a cache to resume, a finished cache, or one to replace, and refuse any folder holding
what dpocli cannot prove it wrote (outputs.py states the rule); then claim it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpocli.cache import store as cache
from dpocli.errors import DpocliError
from dpocli.io import ownership as outputs
from dpocli.io.console import warn
from dpocli.io.folder_lock import FolderLock


def _keep_intact_shards(out: Path, manifest: cache.Manifest) -> cache.Manifest:
    """Drop listed shards that are missing or fail their checksum, so a resume redoes them rather
    than trusting a damaged cache (a finished one becomes unfinished again)."""
    intact = []
    for entry in manifest.shards:
        try:
            cache.verify_shards(out, cache.Manifest(manifest.spec, 0, 0, [entry]))
            intact.append(entry)
        except DpocliError as err:
            warn(f"{err.one_line()}; it will be recomputed")
    if len(intact) != len(manifest.shards):
        manifest.shards = intact
        manifest.complete = False
    return manifest


# Entries of a cache folder that only dpocli writes (besides the shards its manifest lists).
CACHE_NAMES = {cache.MANIFEST_NAME, cache.TOKENIZER_DIR, "config.resolved.toml",
               "precompute.resolved.toml"}  # the last: the name dpocli 0.1 used


def _shard_written_for(path: Path, spec: dict) -> bool:
    """An unlisted shard is ours only if its Parquet metadata carries this cache's spec (a run
    killed between writing the shard and listing it)."""
    import pyarrow.parquet as pq
    if path.is_symlink() or not path.is_file():  # a FIFO would block; a link may point anywhere
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:
        return False
    return meta.get(b"dpocli.spec") == cache.canonical_json(spec).encode()


def _survey_cache(out: Path, manifest: cache.Manifest | None) -> outputs.Survey:
    """Without a manifest nothing is provably ours except the temporaries of a first manifest
    write that was killed; with one, the fixed names, listed shards and shards made for it."""
    if manifest is None:
        return outputs.survey(out, lambda name: False, lambda name: name == cache.MANIFEST_NAME)
    listed = {e["file"] for e in manifest.shards}
    listed |= {e["replay"]["file"] for e in manifest.shards if e.get("replay")}  # a derived cache's

    def is_owned(name: str) -> bool:
        if name in CACHE_NAMES or name in listed:
            return True
        return bool(cache.SHARD_PATTERN.match(name)) and _shard_written_for(out / name, manifest.spec)

    def may_write(name: str) -> bool:
        return name in CACHE_NAMES or bool(cache.SHARD_PATTERN.match(name))
    return outputs.survey(out, is_owned, may_write)


def existing_layout(out: Path) -> tuple[bool, bool] | None:
    """(packing, prefix_sharing) of the dpocli cache already in `out`, or None when there is none
    (or its manifest cannot be read: `inspect_out` then says why). Looks only."""
    if not (out / cache.MANIFEST_NAME).is_file():
        return None
    try:
        batching = cache.read_manifest(out).spec.get("batching", {})
    except DpocliError:
        return None
    if not isinstance(batching, dict):
        return None
    return bool(batching.get("packing", False)), bool(batching.get("prefix_sharing", False))


@dataclass
class OutPlan:
    """What `--out` needs, decided by looking only: `resume` is None for a fresh cache."""

    resume: cache.Manifest | None
    remove: list[Path]
    complete: bool = False


def inspect_out(out: Path, spec: dict, overwrite: bool) -> OutPlan:
    """Decide how to use `out` without touching it. Refuses (exit 2) a folder dpocli did not
    write, a cache made differently (unless --overwrite), and any folder holding foreign files
    that would have to be written into or cleared."""
    if out.exists() and not out.is_dir():
        raise DpocliError("exists and is not a folder", file=out)
    if not out.exists() or not outputs.entries(out):
        return OutPlan(None, [])
    manifest = None
    if (out / cache.MANIFEST_NAME).exists():
        try:
            manifest = cache.read_manifest(out)
        except DpocliError as err:
            raise DpocliError(f"holds a manifest.json dpocli cannot read ({err.message}), so it cannot "
                              "prove it wrote this folder; it will not write into or clear it",
                              file=out, hint="choose another --out, or delete the folder yourself "
                                             "if it is a cache you no longer need") from None
    found = _survey_cache(out, manifest)
    if manifest is None:
        found.refuse_foreign("is not empty and is not a dpocli cache; it")
        return OutPlan(None, found.temporaries)
    differs = cache.explain_mismatch(spec, manifest.spec)
    if differs is None:
        manifest = _keep_intact_shards(out, manifest)
        if manifest.complete:  # nothing to write, so extra entries do no harm
            return OutPlan(manifest, [], complete=True)
        found.refuse_foreign("is an unfinished dpocli cache but")
        listed = {e["file"] for e in manifest.shards}
        stale = [p for p in found.owned if cache.SHARD_PATTERN.match(p.name) and p.name not in listed]
        return OutPlan(manifest, found.temporaries + stale)
    if not overwrite:
        raise DpocliError(f"already holds a cache made differently ({differs})", file=out,
                          hint="pass --overwrite to replace it, or choose another --out")
    found.refuse_foreign("is a dpocli cache but")
    return OutPlan(None, found.owned + found.temporaries)


def claim_out(out: Path, plan: OutPlan, manifest: cache.Manifest, lock: FolderLock | None = None) -> None:
    """Clear what the plan proved to be ours, then commit the manifest first: from here on the
    folder is provably a dpocli cache, so a killed run can be resumed or replaced safely. `lock`
    (taken before the inspection when the folder existed) is taken here otherwise."""
    outputs.remove_owned(plan.remove)
    created = outputs.ensure_folder(out)
    if lock is not None:
        lock.acquire_at_claim()
    try:
        cache.commit_manifest(out, manifest)
    except DpocliError:
        if created:
            outputs.remove_folder_if_empty(out)
        raise
