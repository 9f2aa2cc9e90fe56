"""Which rows a derived cache keeps: the decisions of `dpo cache filter`, `split` and `merge`, made
in one streaming pass over the parent(s) before anything is written.

Each decision is one uint8 per parent row, in the parent's row order: 0 keeps the row, k > 0 drops
it for `REASONS[k - 1]`. A row dropped for several reasons counts under the first in that order.
cache_derive.py then writes the kept rows.

Rules:
* `--dedupe` keeps the first occurrence (in row order) of each exact duplicate (same prompt,
  chosen and rejected ids); `--drop-conflicting` drops every row whose swap (same prompt, chosen
  and rejected exchanged) is elsewhere in the cache, both sides. Both compare 64-bit keys
  (row_keys.py: a false match has probability about n^2 / 2^65).
* `--sample N --seed S` keeps N rows drawn uniformly, without replacement, from those every other
  option keeps (numpy's PCG64 seeded with S), in row order.
* `split` puts a row in the test cache when the first 8 bytes of sha256("<seed>:<id>"), as an
  integer over 2^64, are below `test_size`: the same id lands on the same side in every run,
  whatever else the cache holds.
* `merge` keeps the first row of each id (caches in the order given); a later row with the same
  id is dropped as `merge_duplicate_id`, counted as `same_pair` or `different_pair` by whether
  its tokens equal the kept row's.

Pure pyarrow + numpy: no torch, no transformers.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpocli.cache import row_keys
from dpocli.cache import scan as cache_scan
from dpocli.cache import store as cache
from dpocli.errors import DpocliError, check_seed
from dpocli.io.atomic import sha256_file

REASONS = (
    "filter_identical",
    "filter_truncated",
    "filter_duplicate",
    "filter_conflicting",
    "filter_ref_margin_below",
    "filter_ref_margin_above",
    "filter_total_tokens",
    "filter_not_in_ids",
    "filter_excluded_id",
    "filter_not_sampled",
    "split_test",
    "split_train",
    "merge_duplicate_id",
)
CODE = {reason: k + 1 for k, reason in enumerate(REASONS)}


@dataclass(frozen=True)
class FilterRule:
    """What `dpo cache filter` drops (its flags, checked in `check`)."""

    drop_identical: bool = False
    drop_truncated: bool = False
    dedupe: bool = False
    drop_conflicting: bool = False
    min_ref_margin: float | None = None
    max_ref_margin: float | None = None
    per_token: bool = False
    max_total_tokens: int | None = None
    ids: str | None = None
    exclude_ids: str | None = None
    sample: int | None = None
    seed: int = 0

    def check(self) -> None:
        check_seed(self.seed)
        for flag, value in (("--max-total-tokens", self.max_total_tokens), ("--sample", self.sample)):
            if value is not None and value < 1:
                raise DpocliError(f"must be at least 1, got {value}", field=flag)
        for flag, value in (
            ("--min-ref-margin", self.min_ref_margin),
            ("--max-ref-margin", self.max_ref_margin),
        ):
            if value is not None and not np.isfinite(value):
                raise DpocliError(f"must be a finite number, got {value}", field=flag)
        if (
            None not in (self.min_ref_margin, self.max_ref_margin)
            and self.min_ref_margin > self.max_ref_margin
        ):
            raise DpocliError(f"is above --max-ref-margin {self.max_ref_margin}", field="--min-ref-margin")
        if self.per_token and self.min_ref_margin is None and self.max_ref_margin is None:
            raise DpocliError("needs --min-ref-margin or --max-ref-margin", field="--per-token")
        for flag, path in (("--ids", self.ids), ("--exclude-ids", self.exclude_ids)):
            if path is not None and not Path(path).is_file():
                raise DpocliError("no such file", file=path, field=flag)
        if not self.any():
            raise DpocliError(
                "no filter given; the new cache would equal its parent",
                field="--out",
                hint="pass at least one of --drop-identical, --drop-truncated, --dedupe, "
                "--drop-conflicting, --min/--max-ref-margin, --max-total-tokens, "
                "--ids, --exclude-ids, --sample",
            )

    def any(self) -> bool:
        given = [v for k, v in asdict(self).items() if k not in ("seed", "per_token")]
        return any(v is not None and v is not False for v in given)

    def record(self) -> dict:
        """The rule as the derived cache's spec keeps it: id files by content, not by path."""
        out = {
            k: v
            for k, v in asdict(self).items()
            if (v is not None and v is not False) and k not in ("ids", "exclude_ids")
        }
        if self.sample is None:
            out.pop("seed")  # only --sample draws
        for name in ("ids", "exclude_ids"):
            path = getattr(self, name)
            if path is not None:
                out[name] = {
                    "sha256": sha256_file(path),
                    "ids": len(read_ids(path, "--" + name.replace("_", "-"))),
                }
        return out


def read_ids(path: str, flag: str) -> pa.Array:
    """The ids of an id file: one per line, surrounding whitespace and blank lines ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DpocliError(f"cannot be read as UTF-8 text ({err})", file=path, field=flag) from None
    return pa.array(sorted({line.strip() for line in text.splitlines() if line.strip()}), pa.string())


def _first(codes: np.ndarray, mask: np.ndarray, reason: str) -> None:
    """Give `reason` to the rows of `mask` that no earlier reason dropped."""
    codes[(codes == 0) & mask] = CODE[reason]


def _batch_codes(rows: cache_scan.Rows, rule: FilterRule, max_length: int, id_sets: dict) -> np.ndarray:
    codes = np.zeros(rows.batch.num_rows, dtype=np.uint8)
    if rule.drop_identical:
        _first(codes, rows.identical(), "filter_identical")
    if rule.drop_truncated:
        hit_c, hit_r = rows.at_max_length(max_length)
        _first(codes, hit_c | hit_r, "filter_truncated")
    if rule.min_ref_margin is not None or rule.max_ref_margin is not None:
        margin = rows.margins()[1 if rule.per_token else 0]
        if rule.min_ref_margin is not None:
            _first(codes, margin < rule.min_ref_margin, "filter_ref_margin_below")
        if rule.max_ref_margin is not None:
            _first(codes, margin > rule.max_ref_margin, "filter_ref_margin_above")
    if rule.max_total_tokens is not None:
        _first(codes, rows.total_len() > rule.max_total_tokens, "filter_total_tokens")
    if "ids" in id_sets:
        inside = pc.is_in(rows.column("id"), value_set=id_sets["ids"]).to_numpy(zero_copy_only=False)
        _first(codes, ~inside, "filter_not_in_ids")
    if "exclude_ids" in id_sets:
        excluded = pc.is_in(rows.column("id"), value_set=id_sets["exclude_ids"]).to_numpy(
            zero_copy_only=False
        )
        _first(codes, excluded, "filter_excluded_id")
    return codes


PENDING = 255  # conflicting, unless the row turns out to be a later duplicate (the earlier reason)


def _keyed_codes(
    cache_dir: str, manifest: cache.Manifest, rule: FilterRule, sorted_keys: np.ndarray, codes: np.ndarray
) -> None:
    """--dedupe and --drop-conflicting, from all rows' keys (sorted) and a second pass that looks
    each row's key up: memory stays at 8 bytes a row plus the few rows whose key repeats."""
    start, repeated_rows, repeated_keys = 0, [], []
    for _, batch in cache_scan.iter_shards(cache_dir, manifest, list(cache.ID_COLUMNS)):
        keys = cache_scan.Rows(batch).pair_keys()
        repeated, conflicting = cache_scan.lookup(sorted_keys, keys)
        if rule.drop_conflicting:
            part = codes[start : start + keys.size]  # a view: written in place
            part[conflicting & (part == 0)] = PENDING
        repeated_rows.append(np.flatnonzero(repeated) + start)
        repeated_keys.append(keys[repeated])
        start += keys.size
    if rule.dedupe:
        later = cache_scan.later_duplicates(np.concatenate(repeated_rows), np.concatenate(repeated_keys))
        codes[later[(codes[later] == 0) | (codes[later] == PENDING)]] = CODE["filter_duplicate"]
    codes[codes == PENDING] = CODE["filter_conflicting"]


def filter_codes(cache_dir: str, manifest: cache.Manifest, rule: FilterRule) -> np.ndarray:
    """The filter's decision for every row of `cache_dir` (module docstring)."""
    id_sets = {
        name: read_ids(getattr(rule, name), "--" + name.replace("_", "-"))
        for name in ("ids", "exclude_ids")
        if getattr(rule, name) is not None
    }
    keyed = rule.dedupe or rule.drop_conflicting
    codes = np.zeros(manifest.rows_written, dtype=np.uint8)
    keys = np.zeros(manifest.rows_written if keyed else 0, dtype=np.uint64)
    max_length, start = int(manifest.spec["max_length"]), 0
    for _, batch in cache_scan.iter_shards(cache_dir, manifest, cache_scan.AUDIT_COLUMNS):
        rows = cache_scan.Rows(batch)
        codes[start : start + batch.num_rows] = _batch_codes(rows, rule, max_length, id_sets)
        if keyed:
            keys[start : start + batch.num_rows] = rows.pair_keys()
        start += batch.num_rows
    if keyed and codes.size:
        keys.sort()  # in place; the row-order keys are computed again below, a batch at a time
        _keyed_codes(cache_dir, manifest, rule, keys, codes)
    if rule.sample is not None:
        survivors = np.flatnonzero(codes == 0)
        if rule.sample < survivors.size:
            chosen = np.random.default_rng(rule.seed).choice(survivors.size, rule.sample, replace=False)
            unsampled = np.ones(survivors.size, dtype=bool)
            unsampled[chosen] = False
            codes[survivors[unsampled]] = CODE["filter_not_sampled"]
    return codes


def goes_to_test(row_id: str, seed: int, test_size: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{row_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < test_size * 2.0**64


def split_codes(cache_dir: str, manifest: cache.Manifest, test_size: float, seed: int) -> np.ndarray:
    """1 per row going to the test cache, 0 per row going to the train cache."""
    parts = []
    for _, batch in cache_scan.iter_shards(cache_dir, manifest, ["id"]):
        ids = batch.column(0).to_pylist()
        parts.append(np.fromiter((goes_to_test(i, seed, test_size) for i in ids), dtype=bool, count=len(ids)))
    return (np.concatenate(parts) if parts else np.zeros(0, bool)).astype(np.uint8)


def merge_codes(parents: list[tuple[str, cache.Manifest]]) -> tuple[list[np.ndarray], dict]:
    """Per parent, its decision (0 or merge_duplicate_id), and how many duplicates had the same
    pair or another one."""
    id_hashes, pair_hashes, sizes = [], [], []
    for cache_dir, manifest in parents:
        n = 0
        for _, batch in cache_scan.iter_shards(cache_dir, manifest, ["id", *cache.ID_COLUMNS]):
            rows = cache_scan.Rows(batch)
            id_hashes.append(row_keys.hash_lists(*rows.parts("id")))
            pair_hashes.append(rows.pair_keys())
            n += batch.num_rows
        sizes.append(n)
    ids = np.concatenate(id_hashes) if id_hashes else np.zeros(0, np.uint64)
    pairs = np.concatenate(pair_hashes) if pair_hashes else np.zeros(0, np.uint64)
    order = np.argsort(ids, kind="stable")  # stable: the first of equal ids comes first
    ordered = ids[order]
    repeat = np.zeros(ids.size, dtype=bool)
    repeat[order[1:]] = ordered[1:] == ordered[:-1]
    first = np.empty(ids.size, dtype=np.int64)  # for each row, the first row with its id
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if ids.size else np.zeros(0, np.int64)
    first[order] = np.repeat(order[starts], np.diff(np.r_[starts, ids.size]))
    same = repeat & (pairs == pairs[first])
    codes = np.where(repeat, CODE["merge_duplicate_id"], 0).astype(np.uint8)
    bounds = np.cumsum([0, *sizes])
    found = {
        "duplicate_ids": int(repeat.sum()),
        "same_pair": int(same.sum()),
        "different_pair": int((repeat & ~same).sum()),
        "kept": "first occurrence, in the order the caches were given",
    }
    return [codes[bounds[k] : bounds[k + 1]] for k in range(len(parents))], found
