"""MultiTurnSegLib never imports Slicer; the module compiles and loads before its dependencies are installed."""

from __future__ import annotations

import ast
import py_compile
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slicer_checks import paths  # noqa: E402
from slicer_checks.imports import imported_modules, slicer_imports  # noqa: E402

# What MultiTurnSeg.py may import at module level: the standard library, Slicer's
# own modules and its Slicer-free helper package. Everything else (the library,
# numpy, torch, ...) only inside functions.
ALLOWED_TOP_LEVEL = {"json", "logging", "os", "sys", "tempfile", "ctk", "qt", "vtk", "slicer", "MultiTurnSegSupport"}


def library_files():
    return sorted(paths.LIBRARY_DIR.rglob("*.py"))


def test_library_imports_no_slicer_module():
    offenders = []
    files = library_files()
    assert len(files) > 10
    for path in files:
        for line, module in slicer_imports(path.read_text(encoding="utf-8"), str(path)):
            offenders.append(f"{path.relative_to(paths.REPO)}:{line}: imports {module}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    "snippet",
    [
        "import slicer\n",
        "import slicer.util\n",
        "from slicer.util import arrayFromVolume\n",
        "import qt\n",
        "def f():\n    import vtk\n",
        "def f():\n    from ctk import ctkPathLineEdit\n",
        "import mrml\n",
        "import importlib\nimportlib.import_module('slicer')\n",
        "from vtkmodules.util import numpy_support\n",
    ],
)
def test_slicer_import_scan_catches(snippet):
    assert slicer_imports(snippet), snippet


@pytest.mark.parametrize("snippet", ["import numpy\n", "from .imaging import render_slice\n", "import slicerio\n", "import qtpy_not\n"])
def test_slicer_import_scan_allows(snippet):
    assert not slicer_imports(snippet), snippet


def test_support_package_imports_no_slicer_module():
    for path in paths.SUPPORT_DIR.rglob("*.py"):
        assert not slicer_imports(path.read_text(encoding="utf-8"), str(path)), path


def top_level_import_problems(source: str):
    tree = ast.parse(source)
    return [m for _line, m in imported_modules(tree, top_level_only=True) if m.split(".")[0] not in ALLOWED_TOP_LEVEL]


def test_module_imports_library_lazily():
    problems = top_level_import_problems(paths.MODULE_SCRIPT.read_text(encoding="utf-8"))
    assert not problems, f"imported at module level (must be inside functions): {problems}"
    support_tree = ast.parse((paths.SUPPORT_DIR / "__init__.py").read_text(encoding="utf-8"))
    top = [m for _l, m in imported_modules(support_tree, top_level_only=True)]
    assert not [m for m in top if m.split(".")[0] in ("MultiTurnSegLib", "numpy", "torch")], top


def test_lazy_import_check_fails_on_top_level_library_import():
    assert top_level_import_problems("import slicer\nfrom MultiTurnSegLib import imaging\n") == ["MultiTurnSegLib"]
    assert top_level_import_problems("import numpy as np\n") == ["numpy"]


def test_module_and_support_compile(tmp_path):
    for path in [paths.MODULE_SCRIPT, *paths.SUPPORT_DIR.rglob("*.py")]:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.stem + ".pyc")), doraise=True)


def test_compile_check_fails_on_a_syntax_error(tmp_path):
    bad = tmp_path / "Bad.py"
    bad.write_text("def f(:\n    pass\n")
    with pytest.raises(py_compile.PyCompileError):
        py_compile.compile(str(bad), cfile=str(tmp_path / "Bad.pyc"), doraise=True)
