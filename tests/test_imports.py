"""mmcl's import graph has no cycle, and every mmcl module imports on its own.

The graph is read statically from every `import` / `from ... import` statement of every module
(module level and inside functions): `import a.b.c` is an edge to module a.b.c (importing a
submodule runs its parent packages, but that is no edge to them); `from a.b import c` is an
edge to a.b.c when c is a module, else to a.b; relative imports are resolved against the
importing module's package. Only edges between mmcl modules count.
"""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    """mmcl's packages and their folders, as pyproject's setuptools package-dir maps them."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setup.get("package-dir", {"mmcl": "mmcl"})
    return {name: ROOT / folder for name, folder in mapping.items()}


def mmcl_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of mmcl (mmcl.kernels included)."""
    dirs = package_dirs()
    modules = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            # A folder mapped to its own package (mmcl.kernels) belongs to that mapping only.
            if not any(other != package and other.startswith(package + ".") and name.startswith(other)
                       for other in dirs):
                modules[name] = path
    return modules


def _imported_names(node, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's own package upwards
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module
    return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]


def module_edges(name: str, source: str, is_package: bool, modules) -> set[str]:
    """The modules of `modules` that the import statements of module `name` (at any depth) name."""
    edges = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        targets = _imported_names(node, name, is_package)
        if isinstance(node, ast.ImportFrom):
            prefix, names = targets[0], targets[1:]
            submodules = [t for t in names if t in modules]
            # `from pkg import a, b`: an edge to each submodule named, and to pkg itself when
            # some imported name is not a submodule (that name then comes from pkg).
            targets = submodules + ([prefix] if len(submodules) < len(names) else [])
        edges.update(t for t in targets if t in modules and t != name)
    return edges


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the mmcl modules it imports."""
    return {name: module_edges(name, path.read_text(), path.name == "__init__.py", modules)
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_every_kind_of_import():
    sources = {  # name -> (source, is a package)
        "p": ("from p.a import thing\n", True),
        "p.a": ("def f():\n    from p import b  # function-level, a module of p\n", False),
        "p.b": ("import p.sub.c\nfrom p import a, not_a_module\n", False),
        "p.sub": ("", True),
        "p.sub.c": ("from .. import b\nfrom . import c\nimport os\n", False),
    }
    graph = {name: module_edges(name, src, is_pkg, sources) for name, (src, is_pkg) in sources.items()}
    assert graph == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.sub.c", "p.a", "p"}, "p.sub": set(),
                     "p.sub.c": {"p.b"}}
    assert find_cycle(graph) == ["p", "p.a", "p.b", "p"]
    assert find_cycle({"x": {"y"}, "y": set(), "z": {"x"}}) is None


def test_mmcl_has_no_import_cycle():
    modules = mmcl_modules()
    assert {"mmcl", "mmcl.kernels", "mmcl.models.towers", "mmcl.models.dual_encoder"} <= modules.keys()
    graph = import_graph(modules)
    assert "mmcl.models.towers.hf" in graph["mmcl.models.towers"]  # the walker sees mmcl's imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Each module is imported in a child forked from an interpreter that has loaded third-party
# packages only (torch, numpy): no mmcl module is loaded before it, so it imports on its own.
_IMPORT_EACH = textwrap.dedent("""
    import importlib, os, sys, traceback
    import numpy, torch
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                assert not [m for m in sys.modules if m == "mmcl" or m.startswith("mmcl.")]
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(name)
    print("FAILED:", " ".join(failed))
    sys.exit(1 if failed else 0)
""")


@pytest.mark.slow  # one interpreter plus a forked child per module
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_mmcl_module_imports_on_its_own():
    names = sorted(mmcl_modules())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True,
                            timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    assert result.stdout.strip() == "FAILED:"


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers/ (or train_helpers.py), never in a test_*.py module:
    importing one test module from another runs its module-level fixtures and setup twice."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[-1].startswith("test_")]
    assert not offenders, offenders
