"""The import layers: ``stager.kernels`` imports nothing from ``stager`` outside itself, and
``stager.graphs`` only the kernels, the public names of ``stager.plan`` and ``stager.tree``.

The kernels sit at the bottom of the package, so they can be read, tested and reused without the
rest of the stager; an import of ``stager.errors`` (or anything else above them) from a kernel
file, even one inside a function, breaks that. The staging program and its executors sit just
above them: what they need from the stager (profiler ranges, byte formatting) is handed in.
Across the whole package, the imports run at module load form no cycle: every module can be
read, and imported, after the modules it names.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Callable

import stager
import stager.errors
import stager.kernels.errors


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _stager_imports(tree: ast.AST, *, names: bool = False) -> list[tuple[int, str]]:
    """Every absolute import of ``stager`` or one of its modules in ``tree``: (line, module name);
    with ``names``, ``from`` imports give ``module.name`` for each name imported."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            modules = [f"{node.module}.{a.name}" for a in node.names] if names else [node.module]
        else:
            continue
        found.extend((node.lineno, m) for m in modules if m.split(".")[0] == "stager")
    return found


def _outside_kernels(name: str) -> bool:
    return name != "stager.kernels" and not name.startswith("stager.kernels.")


def _upward(package: str, known_file: str, allowed: Callable[[str], bool], *, names: bool) -> list[str]:
    """``file:line: name`` for each import in ``package``'s files that ``allowed`` refuses."""
    files = sorted(_package_dir(package).rglob("*.py"))
    assert any(f.name == known_file for f in files), f"{package} files not found: {files}"
    return [
        f"{f.name}:{line}: {name}"
        for f in files
        for line, name in _stager_imports(ast.parse(f.read_text(), filename=str(f)), names=names)
        if not allowed(name)
    ]


def test_kernels_import_only_kernels() -> None:
    upward = _upward("stager.kernels", "pack.py", lambda name: not _outside_kernels(name), names=False)
    assert upward == [], f"stager.kernels imports from stager outside stager.kernels: {upward}"


def _allowed_in_graphs(name: str) -> bool:
    """``name`` is ``module`` or ``module.imported_name`` (see ``_stager_imports(names=True)``)."""
    if not _outside_kernels(name) or name.startswith("stager.graphs."):
        return True
    for module in ("stager.plan", "stager.tree"):
        if name == module or (name.startswith(module + ".") and not name.rsplit(".", 1)[1].startswith("_")):
            return True
    return False


def test_graphs_import_only_kernels_plan_and_tree() -> None:
    upward = _upward("stager.graphs", "cuda_graph.py", _allowed_in_graphs, names=True)
    assert upward == [], f"stager.graphs imports from stager outside its layer: {upward}"


def test_graphs_checker_flags_what_is_above_them() -> None:
    src = (
        "from stager import nvtx\n"
        "from stager.envs import format_size\n"
        "from stager.plan import Region, _private\n"
        "from stager.tree import walk\n"
        "from stager.kernels import pack_gather\n"
        "from stager.graphs.ops import PackOp\n"
        "import stager.device\n"
    )
    found = _stager_imports(ast.parse(src), names=True)
    flagged = [name for _, name in found if not _allowed_in_graphs(name)]
    assert flagged == ["stager.nvtx", "stager.envs.format_size", "stager.plan._private", "stager.device"]


def test_checker_sees_lazy_and_bare_imports() -> None:
    src = (
        "import stager\n"
        "import stager.errors as e\n"
        "from stager import errors\n"
        "from stager.kernels import pack\n"
        "from . import table\n"
        "import stagerx\n"
        "def f():\n"
        "    from stager.errors import RegionTableError\n"
    )
    flagged = [name for _, name in _stager_imports(ast.parse(src)) if _outside_kernels(name)]
    assert flagged == ["stager", "stager.errors", "stager", "stager.errors"]


def test_region_table_error_is_one_class() -> None:
    cls = stager.kernels.errors.RegionTableError
    assert stager.RegionTableError is cls
    assert stager.errors.RegionTableError is cls
    assert issubclass(cls, ValueError)
    assert not issubclass(cls, stager.StagerError)


def _modules() -> dict[str, Path]:
    """Every module of the package and its file (``stager.kernels`` etc. live in their own folders)."""
    found: dict[str, Path] = {}
    for package in ("stager", "stager.kernels", "stager.graphs", "stager.headroom", "stager.integrity",
                    "stager.distributed", "stager.benchmarks", "stager.integrations"):
        for f in _package_dir(package).glob("*.py"):
            found[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return found


def _load_time_imports(body: list[ast.stmt], known: dict[str, Path]) -> set[str]:
    """The package modules that running ``body`` imports (not function bodies, not TYPE_CHECKING)."""
    out: set[str] = set()
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            out |= _load_time_imports(node.body + node.orelse, known)
        elif isinstance(node, ast.Try):
            handlers = [s for h in node.handlers for s in h.body]
            out |= _load_time_imports(node.body + node.orelse + node.finalbody + handlers, known)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for line, name in _stager_imports(node, names=True):
                out.add(name if name in known else name.rsplit(".", 1)[0] if isinstance(node, ast.ImportFrom)
                        else name)
    return {m for m in out if m in known}


def test_module_imports_form_no_cycle() -> None:
    known = _modules()
    assert "stager.pipeline" in known and "stager.kernels.pack" in known
    graph = {m: _load_time_imports(ast.parse(f.read_text()).body, known) - {m} for m, f in known.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            assert dep not in path, f"import cycle: {' -> '.join(path[path.index(dep):] + [dep])}"
            if dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])
