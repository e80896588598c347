"""The import layers: ``stager.kernels`` imports nothing from ``stager`` outside itself.

The kernels sit at the bottom of the package, so they can be read, tested and reused without the
rest of the stager; an import of ``stager.errors`` (or anything else above them) from a kernel
file, even one inside a function, breaks that.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import stager
import stager.errors
import stager.kernels.errors


def _kernels_dir() -> Path:
    spec = importlib.util.find_spec("stager.kernels")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _stager_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Every absolute import of ``stager`` or one of its modules in ``tree``: (line, module name)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names = [node.module]
        else:
            continue
        found.extend((node.lineno, name) for name in names if name.split(".")[0] == "stager")
    return found


def _outside_kernels(name: str) -> bool:
    return name != "stager.kernels" and not name.startswith("stager.kernels.")


def test_kernels_import_only_kernels() -> None:
    files = sorted(_kernels_dir().rglob("*.py"))
    assert any(f.name == "pack.py" for f in files), f"kernel files not found: {files}"
    upward = [
        f"{f.name}:{line}: {name}"
        for f in files
        for line, name in _stager_imports(ast.parse(f.read_text(), filename=str(f)))
        if _outside_kernels(name)
    ]
    assert upward == [], f"stager.kernels imports from stager outside stager.kernels: {upward}"


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
