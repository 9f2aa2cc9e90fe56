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
        if path.stem not in ("cli", "__main__"):
            assert "dpocli.cli" not in imports_of(path.stem), path.name


def test_cache_is_pure_pyarrow():
    banned = {"torch", "transformers"}
    assert not {m.split(".")[0] for m in imports_of("cache")} & banned


def test_losses_are_pure_math():
    allowed_dpocli = {"dpocli.errors"}
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
