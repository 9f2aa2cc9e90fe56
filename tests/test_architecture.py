"""The import rules that keep the data flow readable (STYLE.md), checked with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpocli"


def imports_of(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "dpocli":
                found |= {f"dpocli.{alias.name}" for alias in node.names}
    return found


def test_nothing_imports_the_cli():
    for path in PACKAGE.glob("*.py"):
        if path.stem not in ("cli", "__main__", "entry"):  # entry: the process entry, like __main__
            assert "dpocli.cli" not in imports_of(path.stem), path.name


def test_cache_is_pure_pyarrow():
    banned = {"torch", "transformers"}
    assert not {m.split(".")[0] for m in imports_of("cache")} & banned


def test_manifest_needs_no_parquet_library():
    """`dpo cache info` reads only the manifest and the shards' footers (issue 16)."""
    mods = imports_of("manifest")
    assert not {m.split(".")[0] for m in mods} & {"torch", "transformers", "pyarrow", "numpy"}
    allowed = {"dpocli", "dpocli.__version__", "dpocli.atomic", "dpocli.errors"}
    assert {m for m in mods if m.startswith("dpocli")} <= allowed
    assert not {m.split(".")[0] for m in imports_of("atomic") | imports_of("errors")} & {"pyarrow", "numpy"}


def test_losses_are_pure_math():
    allowed_dpocli = {"dpocli.errors", "dpocli.options"}  # options: the loss group LossSpec is built from
    mods = imports_of("losses")
    assert not {m for m in mods if m.startswith("dpocli")} - allowed_dpocli
    assert "transformers" not in {m.split(".")[0] for m in mods}


def test_data_and_tokenization_do_not_touch_models():
    for module in ("data", "tokenization", "batching"):
        assert "transformers" not in {m.split(".")[0] for m in imports_of(module)}, module


def test_modules_stay_small():
    too_big = {p.name: n for p in PACKAGE.glob("*.py")
               if (n := len(p.read_text().splitlines())) > 500}
    assert not too_big, f"split these modules: {too_big}"


def function_lengths() -> dict[str, int]:
    found = {}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[f"{path.stem}.{node.name}"] = node.end_lineno - node.lineno + 1
    return found


def test_no_function_is_longer_than_a_screen_and_a_half():
    too_long = {name: n for name, n in function_lengths().items() if n > 100}
    assert not too_long, f"split these functions: {too_long}"


def test_the_training_loop_stays_readable():
    """train.py is the loop and little else (issue 14): set-up, run folder, policy, wrapping and
    saving live in their own modules, and the loop never branches on a parallelism or LoRA mode."""
    source = (PACKAGE / "train.py").read_text()
    assert len(source.splitlines()) <= 300
    assert function_lengths()["train.run_train"] <= 80
    tree = ast.parse(source)
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_train_step")
    names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None) for n in ast.walk(loop)}
    assert not names & {"fsdp", "lora_r", "enabled"}, names & {"fsdp", "lora_r", "enabled"}


def test_reference_values_travel_as_records_not_string_keyed_dicts():
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        assert 'ref["ref_chosen_logps"]' not in text and "ref['ref_chosen_logps']" not in text, path.name


def test_cache_dataset_modules_need_no_model():
    """`dpo cache audit|filter|split|merge` are a pass over Parquet (issue 26); tests/test_startup.py
    checks the same at run time, imports of imports included."""
    for module in ("row_keys", "cache_scan", "cache_audit", "audit_picture", "cache_select", "cache_derive",
                   "cache_ops", "batch_plan"):
        assert not {m.split(".")[0] for m in imports_of(module)} & {"torch", "transformers"}, module
