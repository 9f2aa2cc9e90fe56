"""Write a derived cache: the rows of one or more parent caches that cache_select.py kept, as a
first-class cache (train, eval, `cache info` and `cache verify` read it like any other).

What a derived cache holds, beyond the kept rows in the parent's order:
* `spec` = the parent's spec plus `derived` (the operation, its options and each parent's spec
  fingerprint, manifest sha256 and row count), so its fingerprint differs from the parent's and
  a run started on one cannot `--resume` on the other;
* per shard, `dropped` = the parent shard's drops plus this operation's, by reason (a shard left
  empty is not written; its drops go to the next written shard, so rows_read still adds up);
* per shard, `replay-NNNNN.parquet` (cache.replay_schema, listed with its sha256): the reference
  forwards precompute ran for the parent shard, as positions into the new shard, with `-(g + 1)`
  for replay-only row g, a dropped pair that shared a forward with a kept one (its token ids only).
  `dpo eval` runs exactly those forwards again, so the reference scores every kept row bit for bit
  as precompute did (cache.read_replay, scoring.plan_like_precompute). A forward with no kept row
  is left out.

Safety: every check runs before anything is written; the cache is built in a temporary folder
next to `--out` and renamed into place (atomic.py); an existing `--out` is replaced only with
`--overwrite` and only when everything in it is provably dpocli's (outputs.py's rule). Shards are
written with fixed options and no timestamps, so the same command gives byte-identical files.

Pure pyarrow + numpy: no torch, no transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpocli import __version__
from dpocli.cache import folder as cache_folder
from dpocli.cache import scan as cache_scan
from dpocli.cache import store as cache
from dpocli.cache.audit import percentile_from_counts
from dpocli.cache.select import REASONS
from dpocli.data.batch_plan import Batching
from dpocli.errors import DpocliError
from dpocli.io import ownership as outputs
from dpocli.io.atomic import atomic_dir, atomic_path, sha256_file


def _owned_names(manifest: cache.Manifest) -> set[str]:
    names = set(cache_folder.CACHE_NAMES)
    for entry in manifest.shards:
        names.add(entry["file"])
        if entry.get("replay"):
            names.add(entry["replay"]["file"])
    return names


def check_out(out: Path, reads: dict[str, str], overwrite: bool, flag: str = "--out") -> None:
    """Refuse an --out that overlaps an input, or that exists and is not a dpocli cache wholly
    written by dpocli (or is one, without --overwrite). Only looks."""
    outputs.check_output_location(out, reads, flag)
    if out.exists() and not out.is_dir():
        raise DpocliError("exists and is not a folder", file=out, field=flag)
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        manifest = cache.read_manifest(out)
    except DpocliError:
        raise DpocliError(
            "is not empty and is not a dpocli cache; dpocli never writes into, clears or "
            "deletes such a folder",
            file=out,
            field=flag,
            hint=f"choose another {flag}",
        ) from None
    owned = _owned_names(manifest)
    outputs.survey(out, lambda name: name in owned).refuse_foreign("is a dpocli cache but")
    if not overwrite:
        raise DpocliError(
            "already holds a dpocli cache",
            file=out,
            field=flag,
            hint="pass --overwrite to replace it, or choose another " + flag,
        )


def parent_record(cache_dir: str, manifest: cache.Manifest) -> dict:
    body = json.loads((Path(cache_dir) / cache.MANIFEST_NAME).read_text(encoding="utf-8"))
    return {
        "spec_fingerprint": manifest.spec_fingerprint,
        "manifest_sha256": body["manifest_sha256"],
        "rows": manifest.rows_written,
        **({"derived": manifest.spec["derived"]} if "derived" in manifest.spec else {}),
    }


def derived_spec(base: dict, operation: dict, parents: list[tuple[str, cache.Manifest]]) -> dict:
    return {**base, "derived": {**operation, "parents": [parent_record(d, m) for d, m in parents]}}


def plan_members(lengths: np.ndarray, batching: Batching) -> tuple[np.ndarray, np.ndarray]:
    """`batch_plan.plan_reference_batches` as (batch number, member) arrays, without a Python loop
    over rows (tests/test_cache_ops.py checks it equals the planner): rows sorted by descending
    prompt + longer completion (ties by position); a batch takes batch_size rows, or as many as
    fit 2 * rows * (its first row's length) <= max_tokens, at least one."""
    seq = lengths[:, 0] + np.maximum(lengths[:, 1], lengths[:, 2])
    order = np.lexsort((np.arange(seq.size), -seq))
    sizes, start = [], 0
    while start < order.size:
        take = batching.batch_size or max(1, batching.max_tokens // (2 * int(seq[order[start]])))
        sizes.append(min(take, order.size - start))
        start += sizes[-1]
    return np.repeat(np.arange(len(sizes), dtype=np.int64), sizes), order.astype(np.int64)


def _parent_plan(
    cache_dir: str, spec: dict, entry: dict, table: pa.Table
) -> tuple[np.ndarray, np.ndarray, pa.Table | None]:
    """The parent shard's reference forwards as (batch, member) arrays (member: a position, or
    -(h + 1) for its replay row h), and its replay rows (None for a shard from precompute-ref)."""
    if entry.get("replay"):
        replay = cache.read_replay_table(Path(cache_dir) / entry["replay"]["file"])
        member = replay.column("member").to_numpy().astype(np.int64)
        ghosts = replay.filter(pa.array(member < 0)).select(list(cache.REPLAY_COLUMNS))
        return replay.column("batch").to_numpy().astype(np.int64), member, ghosts
    prompt = np.diff(table.column("prompt_ids").combine_chunks().offsets.to_numpy())
    lengths = np.stack(
        [prompt, table.column("chosen_len").to_numpy(), table.column("rejected_len").to_numpy()], 1
    )
    batching = Batching.from_records(spec.get("batching"), entry.get("budget"), "manifest.json")
    return (*plan_members(lengths.astype(np.int64), batching), None)


def _replan(
    batch: np.ndarray, member: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch, member, ghost sources) of the new shard: forwards without a kept row are left out,
    kept positions renumbered, every other member becomes replay row g (-(g + 1)) in order of
    appearance; a source is a parent position, or -(h + 1) for the parent's replay row h."""
    kept = np.zeros(member.size, dtype=bool)
    own = member >= 0
    kept[own] = keep[member[own]]
    used = np.bincount(batch, weights=kept, minlength=int(batch.max()) + 1 if batch.size else 0) > 0
    chosen = used[batch]
    batch, member, kept = batch[chosen], member[chosen], kept[chosen]
    renumbered = np.unique(batch, return_inverse=True)[1].astype(np.int32)
    ghost = ~kept
    new_member = np.where(kept, (np.cumsum(keep) - 1)[np.maximum(member, 0)], -np.cumsum(ghost))
    return renumbered, new_member.astype(np.int32), member[ghost]


def _ghost_table(sources: np.ndarray, table: pa.Table, parent_ghosts: pa.Table | None) -> pa.Table:
    pool = table.select(list(cache.REPLAY_COLUMNS))
    if parent_ghosts is not None:
        pool = pa.concat_tables([pool, parent_ghosts.select(list(cache.REPLAY_COLUMNS))])
    index = np.where(sources >= 0, sources, table.num_rows - sources - 1)
    return pool.take(pa.array(index, pa.int64())).combine_chunks()


def _replay_table(batch: np.ndarray, member: np.ndarray, ghosts: pa.Table) -> pa.Table:
    """The replay file of a shard (cache.replay_schema): every member of every forward, in order."""
    empty = pa.table({n: pa.array([[]], pa.list_(pa.int32())) for n in cache.REPLAY_COLUMNS})
    pool = pa.concat_tables([ghosts.select(list(cache.REPLAY_COLUMNS)), empty])
    lists = pool.take(pa.array(np.where(member < 0, -member.astype(np.int64) - 1, ghosts.num_rows)))
    columns = {"batch": pa.array(batch, pa.int32()), "member": pa.array(member, pa.int32())}
    columns.update({n: lists.column(n).combine_chunks() for n in cache.REPLAY_COLUMNS})
    return pa.Table.from_pydict(columns, schema=cache.replay_schema())


def _write_parquet(path: Path, table: pa.Table) -> str:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)
    return sha256_file(path)


class _Lengths:
    """Integer histograms of the kept rows' lengths, for the manifest's `length_stats`."""

    def __init__(self):
        self.counts = {part: np.zeros(1, np.int64) for part in ("prompt", "chosen", "rejected")}

    def add(self, part: str, values: np.ndarray) -> None:
        found = np.bincount(values, minlength=self.counts[part].size)
        found[: self.counts[part].size] += self.counts[part]
        self.counts[part] = found

    def stats(self) -> dict:
        out = {}
        for part, counts in self.counts.items():
            n = int(counts.sum())
            present = np.flatnonzero(counts)
            out[part] = (
                {}
                if n == 0
                else {
                    "mean": round(float((counts * np.arange(counts.size)).sum() / n), 3),
                    "min": int(present[0]),
                    "max": int(present[-1]),
                    "p50": percentile_from_counts(counts, 50),
                    "p95": percentile_from_counts(counts, 95),
                }
            )
        return out


class DerivedWriter:
    """Writes the shards of one derived cache into `folder` (a temporary folder), in order."""

    def __init__(self, folder: Path, spec: dict):
        self.folder, self.spec = folder, spec
        self.entries: list[dict] = []
        self.carry: dict[str, int] = {}  # drops of shards left empty, for the next written shard
        self.lengths = _Lengths()
        self.replay_rows = 0

    def add_shard(
        self, cache_dir: str, entry: dict, spec: dict, codes: np.ndarray, source_offset: int = 0
    ) -> None:
        """Write the kept rows (codes == 0) of the parent shard `entry` of `cache_dir`."""
        with cache_scan.open_shard(cache_dir, entry) as shard:
            table = shard.read()
        dropped = dict(entry.get("dropped", {}))
        for k, n in zip(*np.unique(codes[codes > 0], return_counts=True)):
            dropped[REASONS[int(k) - 1]] = dropped.get(REASONS[int(k) - 1], 0) + int(n)
        keep = codes == 0
        if not keep.any():
            for reason, n in dropped.items():
                self.carry[reason] = self.carry.get(reason, 0) + n
            return
        parent_batch, parent_member, parent_ghosts = _parent_plan(cache_dir, spec, entry, table)
        batch, member, sources = _replan(parent_batch, parent_member, keep)
        kept = table.filter(pa.array(keep))
        if source_offset:
            kept = kept.set_column(
                kept.schema.get_field_index("source_row"),
                "source_row",
                pa.compute.add(kept.column("source_row"), source_offset),
            )
        index = len(self.entries)
        new = cache.write_shard(
            self.folder,
            index,
            {n: kept.column(n).combine_chunks() for n in kept.column_names},
            bool(self.spec["token_logps"]),
            self.spec,
        )
        name = cache.replay_name(index)
        replay_table = _replay_table(batch, member, _ghost_table(sources, table, parent_ghosts))
        replay = {
            "file": name,
            "sha256": _write_parquet(self.folder / name, replay_table),
            "rows": int(sources.size),
            "batches": int(np.unique(batch).size),
        }
        self.replay_rows += int(sources.size)
        for reason, n in self.carry.items():
            dropped[reason] = dropped.get(reason, 0) + n
        self.carry = {}
        chosen, rejected = kept.column("chosen_len").to_numpy(), kept.column("rejected_len").to_numpy()
        new.update(
            dropped=dropped,
            budget=entry.get("budget"),
            tokens=int(chosen.sum() + rejected.sum()),
            replay=replay,
        )
        self.entries.append(new)
        self.lengths.add("prompt", np.diff(kept.column("prompt_ids").combine_chunks().offsets.to_numpy()))
        self.lengths.add("chosen", chosen.astype(np.int64))
        self.lengths.add("rejected", rejected.astype(np.int64))

    def manifest(self, rows_read: int, tokenizer_files: dict, created: dict) -> cache.Manifest:
        if self.carry:  # the last shards were left empty: their drops go to the last written one
            last = self.entries[-1]["dropped"]
            for reason, n in self.carry.items():
                last[reason] = last.get(reason, 0) + n
        return cache.Manifest(
            self.spec,
            planned_shards=len(self.entries),
            rows_read=rows_read,
            shards=self.entries,
            complete=True,
            length_stats=self.lengths.stats(),
            created=created,
            tokenizer_files=dict(tokenizer_files),
        )


def write_derived(
    out: Path, spec: dict, parts: list[tuple[str, cache.Manifest, np.ndarray, int]], command: str
) -> cache.Manifest:
    """Write the cache at `out` from `parts`: (parent folder, its manifest, one code per parent row
    (cache_select.py), source_row offset). `check_out` must have passed."""
    if not any((codes == 0).any() for _, _, codes, _ in parts):
        raise DpocliError("keeps no row; no cache written", file=out, hint="loosen the selection")
    outputs.ensure_folder(out.parent)
    with atomic_dir(out) as tmp:
        writer = DerivedWriter(tmp, spec)
        for cache_dir, manifest, codes, offset in parts:
            start = 0
            for entry in cache_scan.shard_entries(manifest):
                writer.add_shard(
                    cache_dir, entry, manifest.spec, codes[start : start + entry["rows"]], offset
                )
                start += entry["rows"]
        first_dir, first = parts[0][0], parts[0][1]
        shutil.copytree(Path(first_dir) / cache.TOKENIZER_DIR, tmp / cache.TOKENIZER_DIR)
        created = {
            "dpocli_version": __version__,
            "command": command,
            "parents": [str(Path(d).resolve()) for d, _, _, _ in parts],
        }
        result = writer.manifest(sum(m.rows_read for _, m, _, _ in parts), first.tokenizer_files, created)
        cache.commit_manifest(tmp, result)
    return result
