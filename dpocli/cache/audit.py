"""`dpo cache audit`: what the preference data in a cache is, in one streaming pass over Parquet.

Per row group it updates fixed-size accumulators: integer histograms of the token lengths (exact
mean, percentiles and max; lengths are at most `max_length`), a fine histogram of the reference
margins on an asinh scale (exact mean, min, max and accuracy; percentiles to about 0.1%), sums for
the length bias, and the `top` most reversed pairs. The only state that grows with the cache is one
64-bit key per row (`row_keys.pair_keys`) for exact duplicates and swapped (conflicting) pairs.

Definitions (per pair; tokens after truncation, as cached):
    total           prompt + the longer completion (what `max_length` bounds)
    at max_length   prompt + completion reached `max_length`: truncation may have cut it (the
                    cache keeps no length from before truncation, so a completion that fitted
                    exactly counts too)
    identical       chosen_ids == rejected_ids
    near-identical  not identical, and the completions differ only in their last `tail_tokens`
                    tokens: their common prefix covers all but at most that many tokens of the
                    longer one, and is itself at least that long
    duplicate       the same prompt, chosen and rejected ids as an earlier row
    conflicting     the same prompt with chosen and rejected swapped elsewhere in the cache
    margin          ref_chosen_logps - ref_rejected_logps; per token: the difference of the
                    completions' mean log-probs per token
    accuracy        fraction of pairs with margin > 0 (strict, as `dpo eval`)
    length bias     Pearson correlation and least-squares slope of the margin against
                    len(chosen) - len(rejected), and the accuracy by its sign

Pure pyarrow + numpy: no torch, no transformers.
"""

from __future__ import annotations

import heapq
import time
from pathlib import Path

import numpy as np

from dpocli import __version__
from dpocli.cache import audit_picture
from dpocli.cache import scan as cache_scan
from dpocli.errors import DpocliError

MARGIN_SCALE = 1000.0  # histogram bins per unit of asinh(margin)
MARGIN_BINS = 20 * int(MARGIN_SCALE)  # |asinh| <= 20 covers |margin| < 2.4e8
PERCENTILES = (50, 95, 99)


def percentile_from_counts(counts: np.ndarray, q: float) -> float:
    """numpy's default (linear) percentile of the integers whose histogram is `counts`."""
    n = int(counts.sum())
    cumulative = np.cumsum(counts)
    pos = q / 100 * (n - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    x_lo, x_hi = (int(np.searchsorted(cumulative, k, side="right")) for k in (lo, hi))
    return float(x_lo + (x_hi - x_lo) * (pos - lo))


def describe_counts(counts: np.ndarray) -> dict:
    n = int(counts.sum())
    if n == 0:
        return {}
    values = np.arange(counts.size)
    return {
        "mean": round(float((counts * values).sum() / n), 3),
        **{f"p{q}": percentile_from_counts(counts, q) for q in PERCENTILES},
        "max": int(np.flatnonzero(counts)[-1]),
    }


class _Histogram:
    """Integer counts that grow to the largest value seen."""

    def __init__(self):
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        found = np.bincount(values, minlength=self.counts.size)
        if found.size > self.counts.size:
            found[: self.counts.size] += self.counts
            self.counts = found
        else:
            self.counts += found


class _Margins:
    """Exact count, mean, min, max and accuracy; asinh-binned percentiles."""

    def __init__(self):
        self.n, self.total, self.correct = 0, 0.0, 0
        self.low, self.high = np.inf, -np.inf
        self.bins = np.zeros(2 * MARGIN_BINS + 1, dtype=np.int64)

    def add(self, m: np.ndarray) -> None:
        if m.size == 0:
            return
        self.n += m.size
        self.total += float(m.sum())
        self.correct += int((m > 0).sum())
        self.low, self.high = min(self.low, float(m.min())), max(self.high, float(m.max()))
        b = np.clip(np.rint(np.arcsinh(m) * MARGIN_SCALE), -MARGIN_BINS, MARGIN_BINS).astype(np.int64)
        self.bins += np.bincount(b + MARGIN_BINS, minlength=self.bins.size)

    def bin_edges(self, first: int, stop: int) -> np.ndarray:
        """The margins at the edges of bins first..stop-1 (stop - first + 1 values)."""
        return np.sinh((np.arange(first, stop + 1) - MARGIN_BINS - 0.5) / MARGIN_SCALE)

    def percentile(self, q: float) -> float:
        binned = percentile_from_counts(self.bins, q) - MARGIN_BINS
        return float(np.clip(np.sinh(binned / MARGIN_SCALE), self.low, self.high))

    def summary(self) -> dict:
        if self.n == 0:
            return {}
        return {
            "mean": self.total / self.n,
            **{f"p{q}": self.percentile(q) for q in PERCENTILES},
            "min": self.low,
            "max": self.high,
        }


class Audit:
    """The accumulators of one audit; `add` a `cache_scan.Rows`, then `result()`."""

    def __init__(self, max_length: int, tail_tokens: int, top: int, rows: int):
        self.max_length, self.tail_tokens, self.top = max_length, tail_tokens, top
        self.rows = 0
        self.lengths = {part: _Histogram() for part in ("prompt", "chosen", "rejected", "total")}
        self.at_max = {"chosen": 0, "rejected": 0, "either": 0}
        self.identical = self.near_identical = 0
        self.keys = np.zeros(rows, dtype=np.uint64)  # filled in row order, sorted in `result`
        self.margin, self.margin_per_token = _Margins(), _Margins()
        self.bias = np.zeros(5)  # Σx, Σy, Σxx, Σyy, Σxy with x = length difference, y = margin
        self.by_sign = {s: [0, 0, 0.0] for s in ("chosen_shorter", "equal", "chosen_longer")}
        self.reversed: list[tuple[float, int, str, float]] = []  # heap of (-(-margin), order, id, per token)

    def add(self, rows: cache_scan.Rows) -> None:
        p, c, r, total = rows.prompt_len, rows.chosen_len, rows.rejected_len, rows.total_len()
        for part, values in (("prompt", p), ("chosen", c), ("rejected", r), ("total", total)):
            self.lengths[part].add(values)
        hit_c, hit_r = rows.at_max_length(self.max_length)
        self.at_max["chosen"] += int(hit_c.sum())
        self.at_max["rejected"] += int(hit_r.sum())
        self.at_max["either"] += int((hit_c | hit_r).sum())
        prefix = rows.prefix_len()
        identical = (c == r) & (prefix == c)
        self.identical += int(identical.sum())
        near = (prefix >= np.maximum(c, r) - self.tail_tokens) & (prefix >= self.tail_tokens)
        self.near_identical += int((~identical & near).sum())
        self.keys[self.rows : self.rows + rows.batch.num_rows] = rows.pair_keys()
        margin, per_token = rows.margins()
        self.margin.add(margin)
        self.margin_per_token.add(per_token)
        self._add_bias((c - r).astype(np.float64), margin)
        self._add_reversed(rows, margin, per_token)
        self.rows += rows.batch.num_rows

    def _add_bias(self, x: np.ndarray, y: np.ndarray) -> None:
        self.bias += [x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()]
        for name, mask in (("chosen_shorter", x < 0), ("equal", x == 0), ("chosen_longer", x > 0)):
            entry = self.by_sign[name]
            entry[0] += int(mask.sum())
            entry[1] += int((y[mask] > 0).sum())
            entry[2] += float(y[mask].sum())

    def _add_reversed(self, rows: cache_scan.Rows, margin: np.ndarray, per_token: np.ndarray) -> None:
        if self.top == 0:
            return
        negative = np.flatnonzero(margin < 0)
        if negative.size > self.top:  # only the batch's strongest can enter the list
            negative = negative[np.argpartition(margin[negative], self.top - 1)[: self.top]]
        ids = rows.column("id")
        for i in negative:
            item = (-float(margin[i]), -(self.rows + int(i)), ids[int(i)].as_py(), float(per_token[i]))
            if len(self.reversed) < self.top:
                heapq.heappush(self.reversed, item)
            elif item > self.reversed[0]:
                heapq.heapreplace(self.reversed, item)

    def _length_bias(self) -> dict:
        n = self.rows
        sx, sy, sxx, syy, sxy = self.bias
        var_x, var_y = sxx - sx * sx / n, syy - sy * sy / n
        cov = sxy - sx * sy / n
        by_sign = {
            name: {
                "pairs": k,
                "ref_accuracy": (correct / k) if k else None,
                "mean_margin": (total / k) if k else None,
            }
            for name, (k, correct, total) in self.by_sign.items()
        }
        return {
            "correlation": cov / np.sqrt(var_x * var_y) if var_x > 0 and var_y > 0 else None,
            "slope_per_token": cov / var_x if var_x > 0 else None,
            "by_length_difference": by_sign,
        }

    def result(self) -> dict:
        self.keys.sort()  # in place: no second copy of 8 bytes a row
        duplicates, conflicting = cache_scan.count_duplicates_and_conflicts(self.keys)
        strongest = sorted(self.reversed, reverse=True)
        return {
            "rows": self.rows,
            "lengths": {part: describe_counts(h.counts) for part, h in self.lengths.items()},
            "at_max_length": {**self.at_max, "max_length": self.max_length},
            "identical": self.identical,
            "near_identical": {"pairs": self.near_identical, "tail_tokens": self.tail_tokens},
            "duplicates": duplicates,
            "conflicting": conflicting,
            "reference": {
                "accuracy": self.margin.correct / self.rows if self.rows else None,
                "margin": self.margin.summary(),
                "margin_per_token": self.margin_per_token.summary(),
                "length_bias": self._length_bias() if self.rows else {},
                "most_reversed": [{"id": i, "margin": -m, "margin_per_token": t} for m, _, i, t in strongest],
            },
        }


def run_audit(cache_dir: str, *, tail_tokens: int = 4, top: int = 10, out: str | None = None) -> dict:
    """The audit of `cache_dir` as the `--json` object; with `out`, also the picture."""
    t0 = time.perf_counter()
    for flag, value in (("--tail-tokens", tail_tokens), ("--top", top)):
        if value < 0:
            raise DpocliError(f"must be at least 0, got {value}", field=flag)
    if out is not None:
        audit_picture.check_out(Path(out))
    manifest = cache_scan.open_cache(cache_dir, checksums=False)
    audit = Audit(int(manifest.spec["max_length"]), tail_tokens, top, manifest.rows_written)
    for _, batch in cache_scan.iter_shards(cache_dir, manifest, cache_scan.AUDIT_COLUMNS):
        audit.add(cache_scan.Rows(batch))
    summary = {
        "command": "cache audit",
        "dpocli_version": __version__,
        "cache": str(cache_dir),
        "spec_fingerprint": manifest.spec_fingerprint,
        **audit.result(),
        "picture": None,
    }
    if out is not None:
        summary["picture"] = audit_picture.write(Path(out), summary, audit)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
