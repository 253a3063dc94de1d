"""The import graph: the core imports only torch (and safetensors), no module cycle, and names that
moved stay importable from their old modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "freekd"

CORE = (
    "wavelets",
    "prompts",
    "relation",
    "losses",
    "taps",
    "tokens",
    "distill",
    "tuning",
    "checkpoints",
    "calibration",
    "prompt_io",
    "frozen",
)
"""Core modules (DESIGN §3): importable with torch and safetensors alone."""

PIPELINE_PACKAGES = ("train", "data", "models", "evaluation", "pipeline", "cli", "integrations")
PIPELINE_DEPENDENCIES = (
    "lightning",
    "pytorch_lightning",
    "timm",
    "segmentation_models_pytorch",
    "pycocotools",
    "typer",
    "sklearn",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The ``freekd`` modules that ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("freekd"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("freekd"):
                target = node.module
            else:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # "from . import x"
    modules = {_module_name(p) for p in SOURCE.rglob("*.py")}
    return {name for name in found if name in modules and name != module}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, top_level_only) for p in SOURCE.rglob("*.py")}


def _is_under(module: str, package: str) -> bool:
    return module == f"freekd.{package}" or module.startswith(f"freekd.{package}.")


def test_the_module_level_import_graph_has_no_cycle():
    graph = _graph(top_level_only=True)
    # a package imports its own submodules: drop those arrows (they are not cycles)
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_arrow_from_the_core_into_the_pipeline_nor_back_into_the_package_root():
    graph = _graph(top_level_only=False)  # lazy imports inside functions count too
    for module, targets in graph.items():
        if not any(_is_under(module, core) for core in CORE):
            continue
        into_pipeline = sorted(
            t for t in targets if any(_is_under(t, p) for p in PIPELINE_PACKAGES)
        )
        assert not into_pipeline, f"{module} imports the pipeline: {into_pipeline}"
        assert "freekd" not in targets, f"{module} imports the package root (use freekd._version)"


def test_stage_two_and_the_model_builders_do_not_import_stage_one():
    graph = _graph(top_level_only=False)
    users = ["freekd.distill", *(m for m in graph if _is_under(m, "models"))]
    for module in users:
        assert "freekd.tuning" not in graph[module], f"{module} imports freekd.tuning"


def test_every_core_module_imports_with_the_pipeline_dependencies_blocked():
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in PIPELINE_DEPENDENCIES)
    modules = ", ".join(f"freekd.{name}" for name in CORE)
    code = (
        f"import sys; {blocked}\n"
        f"import freekd, {modules}\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{PIPELINE_DEPENDENCIES!r} and sys.modules[m] is not None)\n"
        "assert not leaked, leaked\n"
        "pipeline = sorted(m for m in sys.modules if m.split('.')[:2] in "
        f"[['freekd', p] for p in {PIPELINE_PACKAGES!r}])\n"
        "assert not pipeline, pipeline\n"
        "print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_names_that_moved_are_importable_from_their_old_modules():
    from freekd import frozen, taps, tokens, tuning

    for name in ("TapError", "TokenLayout", "tokens_to_map", "map_to_tokens"):
        assert getattr(taps, name) is getattr(tokens, name)
    for name in ("TaskLoss", "freeze", "loss_terms"):
        assert getattr(tuning, name) is getattr(frozen, name)
