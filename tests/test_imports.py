"""Package structure: no import cycles, and the scheduling core imports without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cdlm", "training")   # training/: the `python -m training` alias of a clone


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Every import the module can execute (module level or inside functions); imports under
    `if TYPE_CHECKING:` are for type checkers only and never run."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def test_no_import_cycles():
    modules = _modules()
    edges = {name: {t for t in _runtime_imports(ast.parse(path.read_text()))
                    if t in modules and t != name}
             for name, path in modules.items()}
    # A package's __init__ is imported by its submodules; count an edge into a package only
    # when the package module really imports something.
    cycles = []
    state: dict[str, int] = {}
    trail: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        trail.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        trail.pop()
        state[node] = 2

    for name in sorted(modules):
        if name not in state:
            walk(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_scheduling_core_imports_without_torch():
    code = ("import sys, cdlm.scheduler, cdlm.sequence, cdlm.page_allocator, cdlm.step_layout, "
            "cdlm.sampling_params; sys.exit(int('torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_installed_package_adds_no_generic_top_level_names(tmp_path):
    """`server` and `training` live inside cdlm: outside a clone they are not importable, and
    the clone's `python -m training` alias runs the same CLI as `python -m cdlm.training`."""
    code = ("import importlib.util, sys; "
            "sys.exit(int(any(importlib.util.find_spec(n) for n in ('server', 'training'))))")
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0
    alias = subprocess.run([sys.executable, "-m", "training", "--help"], cwd=ROOT,
                           capture_output=True, text=True)
    direct = subprocess.run([sys.executable, "-m", "cdlm.training", "--help"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert alias.returncode == direct.returncode == 0 and alias.stdout == direct.stdout
