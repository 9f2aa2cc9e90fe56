"""The house shows the pipeline (STYLE.md, issue 24): stage packages under one layer map, checked
with `ast` over every import between dpocli's modules, those inside functions included."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpocli"

# Which package may import which (besides itself). Read bottom to top, the pipeline: the names
# every layer shares, writing files, stage 1's input and the cache on disk (no torch), models,
# the objective, cache rows scored by a model, then the stages and the command line on top.
LAYERS = {
    "errors": set(),
    "options": {"errors"},
    "io": {"errors"},
    "data": {"errors", "options", "io"},
    "cache": {"errors", "options", "io", "data"},  # data: the index-only batch plans
    "model": {"errors", "options", "io", "data"},
    "objective": {"errors", "options", "io"},
    "scoring": {"errors", "options", "io", "data", "cache", "model", "objective"},
    "precompute": {"errors", "options", "io", "data", "cache", "model", "scoring"},
    "eval": {"errors", "options", "io", "data", "cache", "model", "objective", "scoring"},
    "train": {"errors", "options", "io", "data", "cache", "model", "objective", "scoring", "eval"},
    "cli": {"errors", "options", "io", "data", "cache", "model", "objective", "scoring", "precompute",
            "eval", "train"},
}
# Packages that never import torch or transformers, so `dpo --help` and `dpo cache ...` start fast.
TORCH_FREE = ("errors", "options", "io", "data", "cache")
HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "matplotlib", "pyarrow", "numpy", "safetensors",
         "tokenizers", "typer", "rich", "click", "tensorboard", "torch.utils.tensorboard", "wandb", "mlflow",
         "jinja2", "PIL", "datasets", "huggingface_hub",
         "yaml", "tomli", "tomllib", "ctypes"}  # optional or version-dependent: imported where used


def modules() -> dict[str, Path]:
    """Dotted module name (`dpocli.cache.store`) -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def package_of(module: str) -> str:
    """`dpocli.cache.store` -> `cache`; `dpocli.errors` -> `errors`; `dpocli` -> `dpocli`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


@cache
def imports(module: str) -> tuple[tuple[str, tuple[str, ...], bool], ...]:
    """(imported module, imported names, inside a function?) for every import statement."""
    tree = ast.parse(modules()[module].read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, (), id(node) in inside) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, tuple(a.name for a in node.names), id(node) in inside))
    return tuple(found)


def dpocli_edges(module: str) -> set[str]:
    """The dpocli modules `module` imports: `from dpocli.cache import store` names the submodule."""
    known, edges = modules(), set()
    for target, names, _ in imports(module):
        if not target.startswith("dpocli"):
            continue
        subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in known}
        edges |= subs or ({target} if target in known else set())
        if names and len(subs) < len(names) and target in known:
            edges.add(target)
    return edges - {module}


def test_every_module_lives_in_a_stage_package():
    flat = {name for name, path in modules().items() if path.parent == PACKAGE and path.stem != "__init__"
            and not name.endswith("__main__")}
    assert flat <= {"dpocli.errors", "dpocli.options"}, flat - {"dpocli.errors", "dpocli.options"}
    packages = {package_of(m) for m in modules() if m != "dpocli"} - {"__main__"}
    assert packages == set(LAYERS), packages ^ set(LAYERS)


def test_each_package_imports_only_the_layers_below_it():
    upward = []
    for module in modules():
        if module in ("dpocli", "dpocli.__main__"):
            continue
        mine = package_of(module)
        for target in dpocli_edges(module):
            theirs = package_of(target)
            if theirs not in (mine, "dpocli") and theirs not in LAYERS[mine]:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    """Over every import, those inside functions included: a cycle hidden in a function is still one."""
    graph = {m: {t for t in dpocli_edges(m) if t != "dpocli"} for m in modules()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_another_modules_private_name():
    private = [f"{m}: {t}.{n}" for m in modules() for t, names, _ in imports(m) if t.startswith("dpocli")
               for n in names if n.startswith("_") and n != "__version__"]
    assert not private, private


# The drivers' lazy imports outside cli/: `cache verify` loads the scorer only with --rescore, so
# that without it the command reads Parquet and JSON only (the start-up tests).
LAZY_DRIVERS = {("dpocli.eval.verify", "dpocli.eval.rescore")}


def test_imports_inside_functions_are_heavy_modules_or_the_clis_lazy_drivers():
    late = [f"{m}: {t}" for m in modules() for t, _, inside in imports(m) if inside
            and t.startswith("dpocli") and package_of(m) != "cli" and (m, t) not in LAZY_DRIVERS]
    assert not late, late
    light = [f"{m}: {t}" for m in modules() for t, _, inside in imports(m) if inside
             and not t.startswith("dpocli") and t.split(".")[0] not in {h.split(".")[0] for h in HEAVY}]
    assert not light, light


def test_torch_free_packages_import_no_torch():
    """At import time (start-up): a function may still import torch where it needs it."""
    for module in modules():
        if package_of(module) in TORCH_FREE:
            heavy = {t.split(".")[0] for t, _, inside in imports(module) if not inside} & {"torch", "transformers"}
            assert not heavy, (module, heavy)


def test_nothing_imports_the_cli():
    for module in modules():
        if package_of(module) not in ("cli", "__main__"):
            assert not {t for t in dpocli_edges(module) if package_of(t) == "cli"}, module


def test_cache_store_is_pure_pyarrow():
    banned = {"torch", "transformers"}
    assert not {t.split(".")[0] for t, _, _ in imports("dpocli.cache.store")} & banned


def test_manifest_needs_no_parquet_library():
    """`dpo cache info` reads only the manifest and the shards' footers (issue 16)."""
    mods = {t for t, _, _ in imports("dpocli.cache.manifest")}
    assert not {m.split(".")[0] for m in mods} & {"torch", "transformers", "pyarrow", "numpy"}
    assert dpocli_edges("dpocli.cache.manifest") <= {"dpocli", "dpocli.io.atomic", "dpocli.errors"}
    below = {t for m in ("dpocli.io.atomic", "dpocli.errors") for t, _, _ in imports(m)}
    assert not {m.split(".")[0] for m in below} & {"pyarrow", "numpy"}


def test_losses_are_pure_math():
    assert dpocli_edges("dpocli.objective.losses") <= {"dpocli.errors", "dpocli.options"}
    assert "transformers" not in {t.split(".")[0] for t, _, _ in imports("dpocli.objective.losses")}


def test_data_and_tokenization_do_not_touch_models():
    for module in modules():
        if package_of(module) == "data":
            assert "transformers" not in {t.split(".")[0] for t, _, inside in imports(module) if not inside}, module


def test_layer_map_catches_a_deliberate_violation(tmp_path, monkeypatch):
    """The checks above fail on an upward import, a cycle and a private import: shown with probe
    modules (written to tmp_path, not into the package) added to the module table."""
    import pytest
    probes = {"dpocli.data._probe_up": "from dpocli.train.loop import run_train\n"
                                        "from dpocli.io.atomic import _private\n",
              "dpocli.io._probe_a": "from dpocli.io import _probe_b\n",
              "dpocli.io._probe_b": "from dpocli.io import _probe_a\n"}
    real = modules()
    for name, text in probes.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.setitem(globals(), "modules",
                        lambda: {**real, **{n: tmp_path / f"{n}.py" for n in probes}})
    imports.cache_clear()
    try:
        with pytest.raises(AssertionError, match="_probe_up -> dpocli.train.loop"):
            test_each_package_imports_only_the_layers_below_it()
        with pytest.raises(AssertionError, match="_probe_up: dpocli.io.atomic._private"):
            test_no_module_imports_another_modules_private_name()
        with pytest.raises(AssertionError, match="_probe_a -> dpocli.io._probe_b -> dpocli.io._probe_a"):
            test_no_import_cycle_between_modules()
    finally:
        imports.cache_clear()


def test_modules_stay_small():
    too_big = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
               if (n := len(p.read_text().splitlines())) > 450}
    assert not too_big, f"split these modules: {too_big}"


def function_lengths() -> dict[str, int]:
    found = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    return found


def test_no_function_is_longer_than_a_screen():
    too_long = {name: n for name, n in function_lengths().items() if n > 60}
    assert not too_long, f"split these functions: {too_long}"


def test_the_training_loop_stays_readable():
    """train/loop.py is the loop and little else (issue 14): set-up, run folder, policy, wrapping and
    saving live in their own modules, and the loop never branches on a parallelism or LoRA mode."""
    source = (PACKAGE / "train" / "loop.py").read_text()
    assert len(source.splitlines()) <= 300
    assert function_lengths()["dpocli.train.loop.run_train"] <= 80
    tree = ast.parse(source)
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_train_step")
    names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None) for n in ast.walk(loop)}
    assert not names & {"fsdp", "lora_r", "enabled"}, names & {"fsdp", "lora_r", "enabled"}


def test_reference_values_travel_as_records_not_string_keyed_dicts():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert 'ref["ref_chosen_logps"]' not in text and "ref['ref_chosen_logps']" not in text, path.name
