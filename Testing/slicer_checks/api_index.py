"""Slicer's Python-visible API, as indexed in Testing/Data/slicer/slicer_api.json.

See Testing/Data/slicer/README.md. A class's members are its own names in
``cpp_methods`` / ``vtk_methods`` / ``qt_api`` / ``ctk_classes`` /
``cpp_constants`` plus those of every base found by walking ``superclasses``
(``ctk_superclasses``, ``all_bases`` for several bases). A chain that ends in a
class the index does not hold (QWidget, QObject, QApplication, ...) is "open":
names of that Qt base cannot be checked against the index, so only the few
listed in :data:`QT_BASE_MEMBERS` are accepted there.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

DEFAULT_INDEX = Path(__file__).resolve().parents[1] / "Data" / "slicer" / "slicer_api.json"

# Qt base-class members (Qt itself is not indexed) that the module may use on
# Slicer/CTK classes whose chain ends in that Qt class. Keep this list short
# and only with names from the Qt 5 documentation; anything else on an
# indexed class fails the check.
QT_BASE_MEMBERS: Dict[str, FrozenSet[str]] = {
    "QObject": frozenset({"connect", "disconnect", "objectName", "setObjectName", "setProperty", "property",
                          "deleteLater", "blockSignals", "findChild", "findChildren", "parent", "name", "className"}),
    "QWidget": frozenset({"setEnabled", "enabled", "setVisible", "visible", "show", "hide", "setToolTip", "toolTip",
                          "layout", "setLayout", "setStyleSheet", "styleSheet", "width", "height", "update",
                          "setMRMLScene"}),
    "QAbstractButton": frozenset({"text", "setText", "checked", "setChecked", "click", "checkable", "setCheckable"}),
    "QApplication": frozenset({"processEvents", "setOverrideCursor", "restoreOverrideCursor", "clipboard",
                               "activeWindow", "exit", "quit"}),
}
# Qt classes that inherit another Qt class in the table above.
QT_BASE_PARENTS: Dict[str, str] = {
    "QWidget": "QObject",
    "QAbstractButton": "QWidget",
    "QApplication": "QObject",
    "QFrame": "QWidget",
}


class ApiIndex:
    def __init__(self, path: Path = DEFAULT_INDEX):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text(encoding="utf-8"))
        d = self.data
        self.version = d["slicer_version"]["version"]
        self._own: Dict[str, Set[str]] = {}
        for source in ("cpp_methods", "vtk_methods", "cpp_constants", "cpp_static_methods"):
            for cls, names in d.get(source, {}).items():
                self._own.setdefault(cls, set()).update(names)
        for cls, api in d.get("qt_api", {}).items():
            own = self._own.setdefault(cls, set())
            for key in ("properties", "slots", "signals", "invokables", "decorator_methods"):
                own.update(api.get(key, []) or [])
        for cls, api in d.get("ctk_classes", {}).items():
            own = self._own.setdefault(cls, set())
            for key in ("methods", "properties", "slots", "signals", "invokables", "enum_constants"):
                own.update(api.get(key, []) or [])
        self._properties: Dict[str, Set[str]] = {}
        for source in ("qt_api", "ctk_classes"):
            for cls, api in d.get(source, {}).items():
                self._properties.setdefault(cls, set()).update(api.get("properties", []) or [])
        self.util = {module: set(names) for module, names in d["util_functions"].items()}
        self.slicer_names = set(d["util_functions"]["slicer"]) | set(d["slicer_runtime_attributes"]["slicer"])
        self.modules = set(d["slicer_modules_logic_names"]) | set(d["slicer_runtime_attributes"]["slicer.modules"])
        self.python_classes = d["python_classes"]
        self.python_modules = d["python_modules_api"]

    # -- classes ---------------------------------------------------------------
    def is_class(self, name: str) -> bool:
        return name in self._own or name in self.data["superclasses"] or name in self.data.get("ctk_superclasses", {})

    def bases(self, cls: str) -> List[str]:
        d = self.data
        if cls in d.get("all_bases", {}):
            return list(d["all_bases"][cls])
        base = d["superclasses"].get(cls) or d.get("ctk_superclasses", {}).get(cls)
        if base:
            base = re.sub(r"<.*>$", "", base)  # ctkAbstractFactoryItem<BaseClassType> -> ctkAbstractFactoryItem
            return [base]
        return []

    @lru_cache(maxsize=None)
    def chain(self, cls: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        """(indexed classes in the inheritance graph, external (non-indexed) bases reached)."""
        seen: List[str] = []
        external: List[str] = []
        todo = [cls]
        while todo:
            c = todo.pop(0)
            if c in seen or c in external:
                continue
            if self.is_class(c):
                seen.append(c)
                todo.extend(self.bases(c))
            else:
                external.append(c)
        if cls in self.data.get("external_base_of_class", {}):
            ext = self.data["external_base_of_class"][cls]
            if ext not in external:
                external.append(ext)
        return tuple(seen), tuple(external)

    def members(self, cls: str) -> Set[str]:
        classes, _ext = self.chain(cls)
        out: Set[str] = set()
        for c in classes:
            out |= self._own.get(c, set())
        return out

    def properties(self, cls: str) -> Set[str]:
        classes, _ext = self.chain(cls)
        out: Set[str] = set()
        for c in classes:
            out |= self._properties.get(c, set())
        return out

    def qt_base_members(self, cls: str) -> Set[str]:
        _classes, external = self.chain(cls)
        out: Set[str] = set()
        for base in external:
            b: Optional[str] = base
            while b:
                out |= QT_BASE_MEMBERS.get(b, frozenset())
                b = QT_BASE_PARENTS.get(b)
        return out

    def has_member(self, cls: str, name: str) -> bool:
        return name in self.members(cls) or name in self.qt_base_members(cls)

    # -- Python-level API ----------------------------------------------------------
    def python_class_members(self, qualified: str) -> Set[str]:
        info = self.python_classes.get(qualified)
        if info is None:
            return set()
        out: Set[str] = set()
        for key in ("methods", "attributes", "properties", "staticmethods", "classmethods"):
            out |= set(info.get(key, []))
        return out

    def module_names(self, module: str) -> Optional[Set[str]]:
        """Top-level names of an importable Slicer Python module (SampleData, ...), None if not indexed."""
        if module in self.util:
            return self.util[module]
        info = self.python_modules.get(module)
        if info is None:
            return None
        return set(info.get("names", [])) | set(info.get("classes", {}).keys())

    def python_module_class_members(self, module: str, cls: str) -> Optional[Set[str]]:
        info = self.python_modules.get(module, {}).get("classes", {}).get(cls)
        if info is None:
            return None
        out: Set[str] = set()
        for key in ("methods", "attributes", "properties", "staticmethods", "classmethods"):
            out |= set(info.get(key, []) or [])
        return out


@lru_cache(maxsize=None)
def load_index(path: str = str(DEFAULT_INDEX)) -> ApiIndex:
    return ApiIndex(Path(path))


def names(iterable: Iterable[str]) -> str:
    return ", ".join(sorted(iterable))
