"""The eval table names every model distinguishably, even when the paths share a long prefix."""

from __future__ import annotations

from io import StringIO

from rich.console import Console

from dpocli.cli.tables import EVAL_ROWS, eval_table, model_labels

LONG = "/home/someone/experiments/2026-11-30/a-long-run-name-with-many-details"


def render(paths: list[str], width: int = 80) -> str:
    models = [{"model": p, **{k: 0.5 for k in EVAL_ROWS}} for p in paths]
    summary = {"cache": "heldout-cache", "pairs": 240, "beta": 0.1, "loss": "sigmoid", "models": models}
    buf = StringIO()
    Console(file=buf, width=width, highlight=False).print(eval_table(summary))
    return buf.getvalue()


def test_labels_are_relative_to_the_common_folder():
    paths = [f"{LONG}/checkpoint-{n}" for n in (25, 50, 75)]
    assert model_labels(paths) == (LONG, ["checkpoint-25", "checkpoint-50", "checkpoint-75"])


def test_a_run_and_its_checkpoints_keep_the_run_folder_name():
    assert model_labels(["runs/sample/run", "runs/sample/run/checkpoint-25"]) == \
        ("runs/sample", ["run", "run/checkpoint-25"])


def test_unrelated_paths_and_a_single_model_are_shown_as_given():
    assert model_labels(["sample_data/tiny-llama", "runs/sample/run"]) == \
        ("", ["sample_data/tiny-llama", "runs/sample/run"])
    assert model_labels([f"{LONG}/checkpoint-25"]) == ("", [f"{LONG}/checkpoint-25"])


def test_the_same_model_twice_keeps_full_names():
    assert model_labels(["run/checkpoint-5", "run/checkpoint-5"]) == \
        ("", ["run/checkpoint-5", "run/checkpoint-5"])


def cells(text: str, bar: str) -> list[str]:
    """Each column's text, read across folded lines: `bar` is ┃ for the header, │ for the body."""
    columns: list[str] = []
    for line in text.splitlines():
        if line.count(bar) < 3:
            continue
        parts = [cell.strip() for cell in line.split(bar)[1:-1]]
        columns = columns or [""] * len(parts)
        columns = [c + (" " if c and p else "") + p for c, p in zip(columns, parts)]
    return columns


def test_80_column_table_shows_distinct_step_numbers_and_the_common_folder():
    """The bug: four columns headed by the same 80-column prefix of four checkpoint paths."""
    text = render([f"{LONG}/checkpoint-{n}" for n in (25, 50, 75, 100)])
    header = [cell.replace(" ", "") for cell in cells(text, "┃")]
    assert header == ["metric", "checkpoint-25", "checkpoint-50", "checkpoint-75", "checkpoint-100"]
    assert "…" not in text  # nothing is cut with an ellipsis, model names or metric names
    assert LONG in "".join(text.split())  # the common folder is in the title


def test_cache_info_shows_the_layout_and_attention_it_was_made_with(small_cache):
    """Both belong to the cache's identity (a rerun with another value is refused), so info shows them."""
    from dpocli.cache.store import info as cache_info_dict
    from dpocli.cli.tables import cache_info_table
    info = cache_info_dict(small_cache)
    assert info["batching"] == {"packing": False, "prefix_sharing": False, "rows_per_shard": 16}  # conftest.small_cache
    buf = StringIO()
    Console(file=buf, width=120).print(cache_info_table(info))
    assert "packing False, prefix-sharing False, rows-per-shard 16" in buf.getvalue()
    assert "attention" in buf.getvalue()
