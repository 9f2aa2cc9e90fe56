"""Human-readable result tables (rich) for each command's summary dict; `--json` prints the dict."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported when a table is made: `--json` output needs none
    from rich.table import Table


def _kv_table(title: str, rows: list[tuple[str, object]]) -> Table:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, "" if value is None else str(value))
    return table


def _dropped(d: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "none"


def _lengths(stats: dict) -> list[tuple[str, object]]:
    return [(f"{part} tokens", f"mean {s['mean']}, p50 {s['p50']:g}, p95 {s['p95']:g}, max {s['max']}")
            for part, s in stats.items() if s]


def precompute_table(s: dict) -> Table:
    return _kv_table(f"precompute-ref: {s['status']}", [
        ("cache", s["cache"]), ("rows read", s["rows_read"]), ("rows written", s["rows_written"]),
        ("rows dropped", _dropped(s["rows_dropped"])), ("shards", s["shards"]),
        ("completion tokens scored", s["completion_tokens_scored"]),
        ("tokens/s", s["completion_tokens_per_s"]), ("seconds", s["seconds"]),
        ("spec fingerprint", s["spec_fingerprint"][:16]), *_lengths(s["length_stats"])])


def cache_info_table(s: dict) -> Table:
    model = s["reference_model"]
    return _kv_table(f"cache {s['cache']}", [
        ("complete", f"{s['complete']} ({s['shards']}/{s['planned_shards']} shards)"),
        ("reference model", f"{model['path']} (sha256 {model['sha256'][:12]})"),
        ("dtype", s["dtype"]), ("attention", s["attn_implementation"]),
        ("batch layout", ", ".join(f"{k.replace('_', '-')} {v}" for k, v in sorted(s["batching"].items()))),
        ("max length", f"{s['max_length']} ({s['truncation']})"),
        ("conventions", s["conventions"]), ("per-token log-probs", s["token_logps"]),
        ("input", ", ".join(f["path"] for f in s["input_files"])),
        ("rows read", s["rows_read"]), ("rows written", s["rows_written"]),
        ("rows dropped", _dropped(s["rows_dropped"])),
        *([("images", f"{s['vision']['images']} ({s['vision']['image_bytes']:,} bytes, in the shards; "
                      f"{s['vision']['processor_class']})")] if "vision" in s else []),
        ("spec fingerprint", s["spec_fingerprint"][:16]), *_lengths(s["length_stats"])])


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def train_table(s: dict) -> Table:
    rows = [("run", s["run_dir"]), ("steps", f"{s['steps']}/{s['total_steps']}"),
            ("seconds", s["seconds"]), ("peak RSS MB", s.get("peak_rss_mb"))]
    if "step0_max_abs_diff" in s:
        rows.append(("step-0 max |policy - ref|", f"{s['step0_max_abs_diff']:.3g}"))
    for key in ("train_loss", "train_runtime", "train_samples_per_second"):  # HF's run summary
        if s.get(key) is not None:
            rows.append((key, _fmt(s[key])))
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        if key in s["last_train_metrics"]:
            rows.append((f"last step {key}", _fmt(s["last_train_metrics"][key])))
    for key, value in s["eval"].items():
        rows.append((key, _fmt(value)))
    return _kv_table("train: done", rows)


EVAL_ROWS = ["loss", "rewards/accuracies", "rewards/margins", "rewards/margins_std",
             "rewards/margins_p5", "rewards/margins_p50", "rewards/margins_p95", "rewards/chosen",
             "rewards/rejected", "logps/chosen", "logps/rejected", "logps/chosen_per_token",
             "logps/rejected_per_token", "preference_prob/mean", "displacement/chosen_below_ref",
             "displacement/rejected_below_ref"]


def model_labels(paths: list[str]) -> tuple[str, list[str]]:
    """(common folder, column labels): each model named relative to the folder all of them share.

    Paths that share a long prefix (`runs/sample/run/checkpoint-25`, `.../checkpoint-50`) would be
    cut to identical prefixes in a narrow table; `checkpoint-25` and `checkpoint-50` are not. The
    shared folder is kept out of a label only while every label stays non-empty and distinct, so
    `run` and `run/checkpoint-25` keep the `run` they differ by."""
    parts = [Path(p).parts for p in paths]
    if len(paths) < 2:
        return "", list(paths)
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    labels = [str(Path(*p[common:])) for p in parts]
    if len(set(labels)) < len(labels):  # the same model twice, or paths that differ only in spelling
        return "", list(paths)
    return (str(Path(*parts[0][:common])) if common else ""), labels


def eval_table(s: dict):
    from rich.console import Group
    from rich.table import Table
    folder, labels = model_labels([m["model"] for m in s["models"]])
    table = Table(title=f"eval on {s['cache']} ({s['pairs']} pairs, β={s['beta']}, loss={s['loss']})"
                        + (f"; models in {folder}/" if folder else ""), title_justify="left")
    # Neither metric names nor model labels are ever cut with an ellipsis: too narrow a terminal
    # folds them onto a second line instead, so two columns can never show the same text.
    table.add_column("metric", style="bold", overflow="fold")
    for label in labels:
        table.add_column(label, justify="right", overflow="fold")
    from dpocli.eval.evaluate import LENGTH_BUCKETS  # natural bucket order, shortest chosen first
    keys = EVAL_ROWS + [f"length_bias/{name}/accuracy" for _, _, name in LENGTH_BUCKETS]
    if any("aux_loss" in m for m in s["models"]):  # MoE models: the router loss inside `loss`
        keys.insert(1, "aux_loss")
    for key in keys:
        table.add_row(key, *[("-" if m.get(key) is None else _fmt(m[key])) for m in s["models"]])
    parts = [table]
    for m in s["models"]:
        samples = m.get("samples")
        if not samples:
            continue
        gen = Table(title=f"samples from {m['model']}", title_justify="left", show_lines=True)
        gen.add_column("prompt")
        gen.add_column("policy")
        has_ref = any("reference" in g for g in samples["generations"])
        if has_ref:
            gen.add_column("reference")
        for g in samples["generations"]:
            gen.add_row(g["prompt"], g.get("policy", ""), *([g.get("reference", "")] if has_ref else []))
        parts.append(gen)
        if "kl_policy_ref" in samples:
            kl = samples["kl_policy_ref"]
            parts.append(f"KL(policy‖reference) ≈ {kl['estimate']:.4f} ± {kl['stderr']:.4f} "
                         f"({kl['samples']} samples)")
    return Group(*parts)


def verify_table(s: dict) -> Table:
    rows = [("cache", s["cache"]), ("shards checked", s["shards_checked"]), ("rows", s["rows"]),
            ("checksums", s["checksums"]), ("values finite", s["values_finite"])]
    if "rescored_rows" in s:
        rows += [("re-scored rows", s["rescored_rows"]),
                 ("max |cached - recomputed|", f"{s['rescore_max_abs_diff']:.3g} "
                                               f"(tolerance {s['rescore_tolerance']:g})")]
    return _kv_table("cache verify: ok", rows)


def _dist(d: dict, digits: int = 0) -> str:
    if not d:
        return "none"
    f = (lambda v: f"{v:.{digits}f}") if digits else (lambda v: f"{v:g}")
    return ", ".join(f"{k} {f(v)}" for k, v in d.items() if k != "min")


def audit_table(s: dict) -> Table:
    ref, n = s["reference"], max(s["rows"], 1)
    at_max = s["at_max_length"]
    bias = ref.get("length_bias") or {}
    rows = [("rows", s["rows"])]
    rows += [(f"{part} tokens", _dist(d)) for part, d in s["lengths"].items()]
    rows += [(f"at max_length {at_max['max_length']}",
              f"{at_max['either']} pairs (chosen {at_max['chosen']}, rejected {at_max['rejected']})"),
             ("identical after truncation", f"{s['identical']} ({s['identical'] / n:.1%})"),
             (f"differ only in last {s['near_identical']['tail_tokens']} tokens",
              s["near_identical"]["pairs"]),
             ("exact duplicates", s["duplicates"]), ("conflicting (swapped) pairs", s["conflicting"]),
             ("reference accuracy", "n/a" if ref["accuracy"] is None else f"{ref['accuracy']:.4f}"),
             ("reference margin", _dist(ref["margin"], 3)),
             ("margin per token", _dist(ref["margin_per_token"], 4))]
    if bias.get("correlation") is not None:
        rows.append(("margin vs length difference", f"correlation {bias['correlation']:.3f}, "
                                                    f"slope {bias['slope_per_token']:.4f} per token"))
    for r in ref["most_reversed"]:
        rows.append((f"most reversed: {r['id']}",
                     f"margin {r['margin']:.3f} ({r['margin_per_token']:.4f} per token)"))
    if s.get("picture"):
        rows.append(("picture", s["picture"]))
    return _kv_table(f"cache audit {s['cache']}", rows)


def derived_table(s: dict) -> Table:
    rows = [("cache", s["cache"]), ("rows in", s["rows_in"]), ("rows written", s["rows_written"]),
            ("rows dropped", _dropped(s["rows_dropped"])), ("shards", s["shards"]),
            ("replay-only rows", s["replay_rows"]), ("spec fingerprint", s["spec_fingerprint"][:16])]
    if "duplicates" in s:
        d = s["duplicates"]
        rows.append(("duplicate ids", f"{d['duplicate_ids']} ({d['same_pair']} same pair, "
                                      f"{d['different_pair']} another pair; {d['kept']} kept)"))
    return _kv_table(s["command"], rows)


def split_table(s: dict) -> Table:
    rows = [("parent", s["parent"]), ("test size", f"{s['test_size']:g} (seed {s['seed']})")]
    for side in ("train", "test"):
        rows += [(f"{side} cache", s[side]["cache"]), (f"{side} rows", s[side]["rows_written"])]
    return _kv_table("cache split", rows)
