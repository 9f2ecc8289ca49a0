"""Import scans (AST): which modules a file imports, at top level or anywhere."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, List, Set, Tuple

SLICER_MODULES = {"slicer", "qt", "ctk", "vtk", "mrml", "vtkmodules", "PythonQt", "vtkITK", "qSlicerBaseQTCorePythonQt"}


def imported_modules(tree: ast.AST, *, top_level_only: bool = False) -> List[Tuple[int, str]]:
    """(line, dotted module name) of every import; ``importlib.import_module("x")`` / ``__import__("x")`` count too."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: List[Tuple[int, str]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append((node.lineno, node.module))
        elif not top_level_only and isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def slicer_imports(source: str, filename: str = "<file>") -> List[Tuple[int, str]]:
    """Imports of Slicer-only modules (slicer, qt, ctk, vtk, mrml, ... and their submodules)."""
    tree = ast.parse(source, filename=filename)
    return [(line, m) for line, m in imported_modules(tree) if m.split(".")[0] in SLICER_MODULES]


def local_library_imports(path: Path, package_root: Path, package: str = "MultiTurnSegLib") -> Set[Path]:
    """Files of ``package`` imported by ``path`` (absolute and relative imports), not transitive."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    results: Set[Path] = set()

    def add(dotted: str):
        parts = dotted.split(".")
        if parts[0] != package:
            return
        for i in range(1, len(parts) + 1):
            base = package_root.joinpath(*parts[:i])
            if (base / "__init__.py").is_file():
                results.add(base / "__init__.py")
            elif base.with_suffix(".py").is_file():
                results.add(base.with_suffix(".py"))

    here = None
    try:
        rel = path.resolve().relative_to(package_root.resolve())
        here = list(rel.parts[:-1])
    except ValueError:
        pass
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                add(node.module)
                for a in node.names:
                    add(f"{node.module}.{a.name}")
            elif node.level and here is not None:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                module = ".".join(base + ([node.module] if node.module else []))
                add(module)
                for a in node.names:
                    add(f"{module}.{a.name}")
    return results


def library_closure(start: Iterable[Path], package_root: Path, package: str = "MultiTurnSegLib") -> Set[Path]:
    """Every library file reachable by imports from ``start``."""
    todo = list(start)
    seen: Set[Path] = set()
    while todo:
        p = todo.pop()
        for dep in local_library_imports(p, package_root, package):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen
