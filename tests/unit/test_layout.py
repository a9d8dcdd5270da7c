"""The package tree is the architecture (docs/ARCHITECTURE.md, "Layers"): each subsystem imports only the layers
below it, no modules import each other in a circle, modules stay small, and nothing points outside the repo."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "hf_efftrain"
# Lower layers first; a module may import its own layer and those before it.
LAYERS = ["errors", "cache", "builtins", "runtime", "core", "techniques", "plan", "bench", "cli"]
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every hf_efftrain module this file imports, at any depth (function-level imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hf_efftrain"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hf_efftrain"):
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import module`
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_each_layer_imports_only_the_layers_below_it(graph):
    upward = []
    for module, targets in graph.items():
        if _layer(module) is None:  # hf_efftrain/__init__ (the public API) and __main__ sit on top
            continue
        for target in targets:
            if _layer(target) is not None and LAYERS.index(_layer(target)) > LAYERS.index(_layer(module)):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_nothing_imports_the_cli(graph):
    assert not [m for m, targets in graph.items() if "hf_efftrain.cli" in targets and m != "hf_efftrain.__main__"]


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components over module -> module edges (package __init__s included).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by responsibility): {big}"


def test_nothing_refers_to_a_path_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    # The steering folder beside a checkout, and its design page: spelt in pieces so this file does not match itself.
    outside, design = "shared", "DESIGN"
    pattern = re.compile(rf"\.\./{outside}\b|{outside}/{design}|{design}\.md")
    hits = []
    for name in files:
        path = REPO / name
        if path.suffix in {".png", ".json", ".npz"} or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not hits, f"references to files a clone does not have: {hits}"


def test_the_public_api_imports():
    import hf_efftrain
    from hf_efftrain import EffTrainer, Recipe, RecipeError, Technique, load_recipe, register_technique, train

    assert EffTrainer.__name__ == "EffTrainer" and callable(train) and callable(load_recipe)
    assert issubclass(RecipeError, ValueError) and Recipe and Technique and register_technique
    assert set(hf_efftrain.__all__) >= {"EffTrainer", "train", "load_recipe", "Recipe", "RecipeError"}


@pytest.mark.parametrize(
    "module, names",
    [  # each technique's functional core, as the README's "By hand, with the stock Trainer" uses them
        ("lion", ["Lion"]),
        ("lamb", ["Lamb"]),
        ("packing", ["pack_dataset"]),
        ("token_dropping", ["TokenDropper"]),
        ("t_fixup", ["apply_t_fixup"]),
    ],
)
def test_functional_cores_import_from_their_technique_module(module, names):
    import importlib

    mod = importlib.import_module(f"hf_efftrain.techniques.{module}")
    assert all(hasattr(mod, n) for n in names), [n for n in names if not hasattr(mod, n)]
