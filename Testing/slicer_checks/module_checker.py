"""Check a scripted module's use of Slicer's API against the API index (no Slicer needed).

An AST pass over the module that knows, for each expression it can, which
Slicer/MRML/VTK/CTK class it holds, and reports every use the index does not
support:

* ``slicer.util.X``, ``from slicer.util import X``, ``from slicer.i18n import X``, ...
  -> X must be defined in that Slicer Python module;
* ``slicer.X`` -> a name of the ``slicer`` package, a runtime attribute or a
  wrapped class; ``vtk.X`` / ``ctk.X`` -> an indexed class;
* ``slicer.modules.X`` (also ``hasattr(slicer.modules, "X")``) -> a module of
  Slicer, of an extension this one depends on, or this module itself;
* ``obj.Method(...)`` / ``obj.attr`` / ``obj.prop = v`` where ``obj``'s class is
  known -> the name exists in that class or a base (``superclasses`` walked);
* ``obj.Method(...)`` with an UpperCamelCase name (VTK/MRML style) where ``obj``'s
  class is NOT known -> error: annotate it (``x: "vtkMRMLSliceNode" = ...``);
* ``self.method(...)`` in a subclass of a ScriptedLoadableModule class or
  VTKObservationMixin -> defined in the class or its Slicer base;
* ``Module.attr`` for imported Slicer Python modules (SampleData, ...) and
  ``Module.Class().method`` -> defined there.

Types come from: string annotations (arguments, ``x: "cls" = ...``, return
annotations of the module's own functions); ``slicer.mrmlScene``,
``slicer.app``; constructors (``vtk.vtkMatrix4x4()``, ``slicer.vtkMRML...()``);
``AddNewNodeByClass("cls")``; the .ui file for ``self.ui.<name>``; and
:data:`RETURN_TYPES` for methods whose result class the index does not give.
Pure Qt classes (QPushButton, QComboBox, ...) are not in the index and are not
checked.
"""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from .api_index import ApiIndex, load_index

UPPER_CAMEL = re.compile(r"^[A-Z][A-Za-z0-9]*$")

# (class, method) -> class of the returned object, for results the module uses.
# The lookup walks the receiver's bases, so an entry for a base class serves
# all subclasses.
RETURN_TYPES: Dict[Tuple[str, str], str] = {
    ("qSlicerApplication", "layoutManager"): "qSlicerLayoutManager",
    ("qSlicerLayoutManager", "sliceWidget"): "qMRMLSliceWidget",
    ("qMRMLSliceWidget", "mrmlSliceNode"): "vtkMRMLSliceNode",
    ("qMRMLSliceWidget", "sliceLogic"): "vtkMRMLSliceLogic",
    ("vtkMRMLSliceNode", "GetSliceToRAS"): "vtkMatrix4x4",
    ("vtkMRMLSegmentationNode", "GetSegmentation"): "vtkSegmentation",
    ("vtkSegmentation", "GetSegment"): "vtkSegment",
    ("vtkMRMLNode", "GetNodeReference"): "vtkMRMLNode",
    ("vtkMRMLDisplayableNode", "GetDisplayNode"): "vtkMRMLDisplayNode",
    ("vtkMRMLTransformableNode", "GetParentTransformNode"): "vtkMRMLTransformNode",
    ("vtkMRMLVolumeNode", "GetImageData"): "vtkImageData",
    ("vtkMRMLScene", "GetNodeByID"): "vtkMRMLNode",
    ("vtkMRMLScene", "GetFirstNodeByClass"): "vtkMRMLNode",
    ("qMRMLNodeComboBox", "currentNode"): "vtkMRMLNode",
}
# Python-level Slicer methods -> class of the result.
PYTHON_RETURN_TYPES: Dict[Tuple[str, str], str] = {
    ("slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic", "getParameterNode"): "vtkMRMLScriptedModuleNode",
}
SLICER_ATTRIBUTE_TYPES = {
    "mrmlScene": "vtkMRMLScene",
    "app": "qSlicerApplication",
    "dicomDatabase": "ctkDICOMDatabase",
}
SCRIPTED_BASES = {
    "ScriptedLoadableModule": "slicer.ScriptedLoadableModule.ScriptedLoadableModule",
    "ScriptedLoadableModuleWidget": "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget",
    "ScriptedLoadableModuleLogic": "slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic",
    "ScriptedLoadableModuleTest": "slicer.ScriptedLoadableModule.ScriptedLoadableModuleTest",
    "VTKObservationMixin": "slicer.util.VTKObservationMixin",
}
# The C++ object behind ``self.parent`` of a scripted module class.
SCRIPTED_PARENT_TYPES = {
    "ScriptedLoadableModule": "qSlicerScriptedLoadableModule",
}
UNITTEST_METHODS = {n for n in dir(__import__("unittest").TestCase) if not n.startswith("__")}
# Python names on the vtk module that are not classes.
VTK_PYTHON_NAMES = {"reference", "util", "vtkCommand"}
# Names on the slicer package the module may use although the index files
# them elsewhere: none so far (keep it that way if possible).
SLICER_EXTRA_NAMES: Set[str] = set()


@dataclass(frozen=True)
class T:
    """What the checker knows about a value."""

    kind: str  # "obj" (C++ instance), "cls" (C++ class object), "py" (module-defined class instance),
    # "ui" (self.ui namespace), "slicer-module" (slicer.modules), "pymod" (imported Python module)
    name: str


@dataclass
class Finding:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class Report:
    errors: List[Finding] = field(default_factory=list)
    checked: List[Tuple[int, str]] = field(default_factory=list)  # (line, "Class.member" or "slicer.util.x")

    def checked_names(self) -> Set[str]:
        return {name for _line, name in self.checked}


@dataclass
class ModuleContext:
    module_name: str  # e.g. MultiTurnSeg
    ui_widgets: Dict[str, str]  # widget name -> class (from the .ui file)
    ui_root_class: str = "qMRMLWidget"
    extension_modules: Sequence[str] = ()  # slicer.modules names provided by EXTENSION_DEPENDS


def _annotation_class(node: Optional[ast.AST]) -> Optional[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.strip()
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
        return node.attr
    return None


class _Checker(ast.NodeVisitor):
    def __init__(self, index: ApiIndex, ctx: ModuleContext, tree: ast.Module):
        self.index = index
        self.ctx = ctx
        self.report = Report()
        self.module_aliases: Dict[str, str] = {}  # local name -> python module path ("slicer", "vtk", "SampleData", ...)
        self.from_imports: Dict[str, Tuple[str, str]] = {}  # local name -> (module, name)
        self.classes: Dict[str, ast.ClassDef] = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        self.functions: Dict[str, ast.FunctionDef] = {
            n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        self.scopes: List[Dict[str, T]] = [{}]
        self.class_stack: List[ast.ClassDef] = []
        self.self_attr_types: Dict[Tuple[str, str], T] = {}

    # -- reporting -----------------------------------------------------------------
    def error(self, node: ast.AST, message: str) -> None:
        self.report.errors.append(Finding(getattr(node, "lineno", 0), message))

    def ok(self, node: ast.AST, name: str) -> None:
        self.report.checked.append((getattr(node, "lineno", 0), name))

    # -- scopes --------------------------------------------------------------------
    def lookup(self, name: str) -> Optional[T]:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def bind(self, name: str, t: Optional[T]) -> None:
        if t is None:
            self.scopes[-1].pop(name, None)
        else:
            self.scopes[-1][name] = t

    def class_type(self, cls: str, node: ast.AST) -> Optional[T]:
        if self.index.is_class(cls):
            return T("obj", cls)
        if cls in self.classes:
            return T("py", cls)
        self.error(node, f"annotation names {cls!r}, which is not a class in Slicer {self.index.version}'s API index")
        return None

    # -- imports -------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            local = alias.asname or alias.name.split(".")[0]
            self.module_aliases[local] = alias.name if alias.asname else alias.name.split(".")[0]
            self.bind(local, T("pymod", self.module_aliases[local]))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        known = self.index.module_names(module) if (module == "slicer" or module.startswith("slicer.")) else None
        if (module == "slicer" or module.startswith("slicer.")) and known is None:
            self.error(node, f"'{module}' is not a Python module of Slicer {self.index.version}")
        for alias in node.names:
            local = alias.asname or alias.name
            self.from_imports[local] = (module, alias.name)
            if known is not None and alias.name != "*":
                if module == "slicer":
                    ok = alias.name in known or self.index.is_class(alias.name)
                else:
                    ok = alias.name in known
                if ok:
                    self.ok(node, f"{module}.{alias.name}")
                else:
                    self.error(node, f"{module} has no '{alias.name}' in Slicer {self.index.version}")
            if module == "slicer" and self.index.is_class(alias.name):
                self.bind(local, T("cls", alias.name))

    # -- definitions -----------------------------------------------------------------
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.class_stack.append(node)
        self.scopes.append({})
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()
        self.class_stack.pop()

    def _visit_function(self, node) -> None:
        for dec in node.decorator_list:
            self.visit(dec)
        self.scopes.append({})
        args = node.args
        for a in list(args.posonlyargs) + list(args.args) + list(args.kwonlyargs):
            cls = _annotation_class(a.annotation)
            if cls:
                t = self.class_type(cls, a)
                if t:
                    self.bind(a.arg, t)
        for default in list(args.defaults) + [d for d in args.kw_defaults if d is not None]:
            self.visit(default)
        if node.returns is not None:
            cls = _annotation_class(node.returns)
            if cls:
                self.class_type(cls, node)
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.scopes.append({})
        self.visit(node.body)
        self.scopes.pop()

    # -- assignments -----------------------------------------------------------------
    def visit_Assign(self, node: ast.Assign) -> None:
        t = self.infer(node.value)
        for target in node.targets:
            self._assign(target, t)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.infer(node.value)
        cls = _annotation_class(node.annotation)
        t = self.class_type(cls, node) if cls else None
        self._assign(node.target, t)

    def _assign(self, target: ast.AST, t: Optional[T]) -> None:
        if isinstance(target, ast.Name):
            self.bind(target.id, t)
        elif isinstance(target, ast.Attribute):
            base = self.infer(target.value)
            if base is not None and base.kind == "obj":
                self.check_member(target, base.name, target.attr, store=True)
            if (
                isinstance(target.value, ast.Name)
                and target.value.id == "self"
                and self.class_stack
                and t is not None
            ):
                self.self_attr_types[(self.class_stack[-1].name, target.attr)] = t
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self._assign(elt, None)
        else:
            self.infer(target)

    def visit_Expr(self, node: ast.Expr) -> None:
        self.infer(node.value)

    def generic_visit(self, node: ast.AST) -> None:
        # Statements: visit children; expressions found in them go through infer().
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.infer(child)
            else:
                self.visit(child)

    def visit_For(self, node: ast.For) -> None:
        self.infer(node.iter)
        self._assign(node.target, None)
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    def visit_With(self, node: ast.With) -> None:
        for item in node.items:
            t = self.infer(item.context_expr)
            if item.optional_vars is not None:
                self._assign(item.optional_vars, None if t is None else None)
        for stmt in node.body:
            self.visit(stmt)

    # -- expressions -------------------------------------------------------------------
    def infer(self, node: Optional[ast.AST]) -> Optional[T]:
        if node is None:
            return None
        method = getattr(self, "infer_" + node.__class__.__name__, None)
        if method is not None:
            return method(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.infer(child)
            elif isinstance(child, ast.comprehension):
                self.infer(child.iter)
                self._assign(child.target, None)
                for cond in child.ifs:
                    self.infer(cond)
            elif isinstance(child, (ast.arguments,)):
                pass
        return None

    def infer_Name(self, node: ast.Name) -> Optional[T]:
        t = self.lookup(node.id)
        if t is not None:
            return t
        if node.id in self.module_aliases:
            return T("pymod", self.module_aliases[node.id])
        if node.id in self.classes:
            return T("pyclass", node.id)
        return None

    def _enclosing_scripted_bases(self) -> List[str]:
        if not self.class_stack:
            return []
        return [b.id for b in self.class_stack[-1].bases if isinstance(b, ast.Name)]

    def infer_Attribute(self, node: ast.Attribute) -> Optional[T]:
        # self.<attr> inside a module class
        if isinstance(node.value, ast.Name) and node.value.id == "self" and self.class_stack:
            cls = self.class_stack[-1]
            if node.attr == "ui":
                return T("ui", "ui")
            if node.attr == "parent":
                for base in self._enclosing_scripted_bases():
                    if base in SCRIPTED_PARENT_TYPES:
                        return T("obj", SCRIPTED_PARENT_TYPES[base])
            known = self.self_attr_types.get((cls.name, node.attr))
            if known is not None:
                return known
            if node.attr == "logic":
                logic = self.ctx.module_name + "Logic"
                if logic in self.classes:
                    return T("py", logic)
            return None
        base = self.infer(node.value)
        if base is None:
            return None
        return self.member_type(node, base, node.attr, call=False)

    def member_type(self, node: ast.AST, base: T, attr: str, call: bool) -> Optional[T]:
        """Check ``base.attr`` and return what it holds (for calls: the callable's owner info)."""
        if base.kind == "pymod":
            return self.module_attribute(node, base.name, attr)
        if base.kind == "slicer-module":
            return None
        if base.kind == "ui":
            cls = self.ctx.ui_widgets.get(attr)
            if cls is None:
                self.error(node, f"self.ui.{attr} is not a widget of the .ui file")
                return None
            self.ok(node, f"ui.{attr}")
            return T("obj", cls) if self.index.is_class(cls) else T("qt", cls)
        if base.kind in ("obj", "cls"):
            self.check_member(node, base.name, attr)
            if base.kind == "obj" and not call:
                return None
            return T("member", f"{base.name}.{attr}")
        if base.kind in ("py", "pyclass"):
            self.check_python_member(node, base.name, attr)
            return T("pymember", f"{base.name}.{attr}")
        return None

    def module_attribute(self, node: ast.AST, module: str, attr: str) -> Optional[T]:
        idx = self.index
        if module == "slicer":
            if attr == "modules":
                return T("slicer-module", "modules")
            if attr == "util":
                return T("pymod", "slicer.util")
            if attr in SLICER_ATTRIBUTE_TYPES:
                self.ok(node, f"slicer.{attr}")
                return T("obj", SLICER_ATTRIBUTE_TYPES[attr])
            if idx.is_class(attr):
                self.ok(node, f"slicer.{attr}")
                return T("cls", attr)
            if attr in idx.slicer_names or attr in SLICER_EXTRA_NAMES:
                self.ok(node, f"slicer.{attr}")
                return None
            self.error(node, f"slicer.{attr} does not exist in Slicer {idx.version}")
            return None
        if module in ("vtk", "ctk"):
            if idx.is_class(attr):
                self.ok(node, f"{module}.{attr}")
                return T("cls", attr)
            if module == "vtk" and attr in VTK_PYTHON_NAMES:
                return None
            self.error(node, f"{module}.{attr} is not a class in Slicer {idx.version}'s API index")
            return None
        names = idx.module_names(module)
        if names is not None:
            if attr in names:
                self.ok(node, f"{module}.{attr}")
                if module in idx.python_modules and attr in idx.python_modules[module].get("classes", {}):
                    return T("slicer-pyclass", f"{module}.{attr}")
                return None
            self.error(node, f"{module}.{attr} does not exist in Slicer {idx.version}")
        return None

    def check_member(self, node: ast.AST, cls: str, attr: str, store: bool = False) -> None:
        idx = self.index
        if store:
            ok = attr in idx.properties(cls) or attr in idx.qt_base_members(cls)
            if not ok:
                self.error(node, f"{cls} has no property '{attr}' to set (Slicer {idx.version})")
            else:
                self.ok(node, f"{cls}.{attr}")
            return
        if idx.has_member(cls, attr):
            self.ok(node, f"{cls}.{attr}")
        else:
            self.error(node, f"{cls} has no member '{attr}' in Slicer {idx.version} (bases walked: "
                       f"{' -> '.join(idx.chain(cls)[0])})")

    def _python_bases(self, cls: str) -> List[str]:
        node = self.classes.get(cls)
        if node is None:
            return []
        return [b.id for b in node.bases if isinstance(b, ast.Name)]

    def _python_members(self, cls: str) -> Tuple[Set[str], bool]:
        """(names defined by the class and its module/Slicer bases, complete?)."""
        node = self.classes.get(cls)
        out: Set[str] = set()
        complete = True
        if node is None:
            return out, False
        for stmt in ast.walk(node):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(stmt.name)
            elif isinstance(stmt, ast.Attribute) and isinstance(stmt.ctx, ast.Store) and isinstance(stmt.value, ast.Name) and stmt.value.id == "self":
                out.add(stmt.attr)
            elif isinstance(stmt, ast.Name) and isinstance(stmt.ctx, ast.Store):
                out.add(stmt.id)
        for base in self._python_bases(cls):
            if base in SCRIPTED_BASES:
                out |= self.index.python_class_members(SCRIPTED_BASES[base])
                if base == "ScriptedLoadableModuleTest":
                    out |= UNITTEST_METHODS
            elif base in self.classes:
                more, c = self._python_members(base)
                out |= more
                complete &= c
            else:
                complete = False
        return out, complete

    def check_python_member(self, node: ast.AST, cls: str, attr: str) -> None:
        members, complete = self._python_members(cls)
        if attr in members:
            self.ok(node, f"{cls}.{attr}")
        elif complete:
            self.error(node, f"{cls} (and its Slicer base classes) has no '{attr}'")

    def infer_Call(self, node: ast.Call) -> Optional[T]:
        for arg in node.args:
            self.infer(arg)
        for kw in node.keywords:
            self.infer(kw.value)
        func = node.func
        # hasattr(slicer.modules, "x")
        if isinstance(func, ast.Name) and func.id in ("hasattr", "getattr") and len(node.args) >= 2:
            target = self.infer(node.args[0])
            name = node.args[1]
            if target is not None and target.kind == "slicer-module" and isinstance(name, ast.Constant) and isinstance(name.value, str):
                self.check_slicer_module(node, name.value)
            return None
        if isinstance(func, ast.Name):
            t = self.infer(func)
            if t is not None and t.kind == "cls":
                return T("obj", t.name)
            if t is not None and t.kind == "pyclass":
                return T("py", t.name)
            fn = self.functions.get(func.id)
            if fn is not None and fn.returns is not None:
                cls = _annotation_class(fn.returns)
                if cls and self.index.is_class(cls):
                    return T("obj", cls)
            return None
        if not isinstance(func, ast.Attribute):
            self.infer(func)
            return None
        # self.method(...) in a module class
        if isinstance(func.value, ast.Name) and func.value.id == "self" and self.class_stack:
            cls = self.class_stack[-1].name
            members, complete = self._python_members(cls)
            if func.attr in members:
                self.ok(node, f"{cls}.{func.attr}")
            elif complete or any(b in SCRIPTED_BASES for b in self._python_bases(cls)):
                self.error(node, f"self.{func.attr}() is defined neither in {cls} nor in its Slicer base classes")
            return self._python_method_return(cls, func.attr)
        base = self.infer(func.value)
        if base is None:
            if UPPER_CAMEL.match(func.attr) and not self._is_python_object(func.value):
                self.error(
                    node,
                    f"cannot tell which Slicer/VTK class '{ast.unparse(func.value)}' is, for the call "
                    f".{func.attr}(); annotate it (e.g. x: \"vtkMRMLSliceNode\" = ...)",
                )
            return None
        if base.kind == "slicer-module":
            return None
        if base.kind == "qt":
            return None
        if base.kind in ("slicer-pyclass", "slicer-pyinstance"):
            # SampleData.SampleDataLogic().downloadSample(...): a Python class of a Slicer module
            module, cls = base.name.rsplit(".", 1)
            members = self.index.python_module_class_members(module, cls) or set()
            if func.attr in members:
                self.ok(node, f"{base.name}.{func.attr}")
            else:
                self.error(node, f"{base.name} has no '{func.attr}' in Slicer {self.index.version}")
            return None
        owner = self.member_type(func, base, func.attr, call=True)
        if base.kind in ("obj", "cls"):
            if base.kind == "obj" and func.attr == "AddNewNodeByClass" and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    if self.index.is_class(first.value):
                        return T("obj", first.value)
                    self.error(node, f"AddNewNodeByClass: {first.value!r} is not an MRML class")
            return self._cpp_return(base.name, func.attr)
        if base.kind == "pymod" and owner is not None and owner.kind == "cls":
            return T("obj", owner.name)
        if base.kind == "pymod" and owner is not None and owner.kind == "slicer-pyclass":
            return T("slicer-pyinstance", owner.name)
        if base.kind == "pymod" and base.name == "slicer.util" and func.attr == "loadUI":
            return T("obj", self.ctx.ui_root_class)
        if base.kind == "pymod" and base.name == "slicer.util" and func.attr == "childWidgetVariables":
            return T("ui", "ui")
        if base.kind in ("py",):
            return self._python_method_return(base.name, func.attr)
        return None

    def infer_Subscript(self, node: ast.Subscript) -> Optional[T]:
        self.infer(node.value)
        self.infer(node.slice)
        return None

    def _is_python_object(self, node: ast.AST) -> bool:
        """Receivers that are plainly not Slicer objects (modules, literals, builtins)."""
        if isinstance(node, ast.Name):
            if node.id in self.module_aliases or node.id in self.from_imports:
                return True
            if hasattr(builtins, node.id):
                return True
        if isinstance(node, (ast.Constant, ast.JoinedStr, ast.List, ast.Dict, ast.Tuple)):
            return True
        return False

    def _cpp_return(self, cls: str, method: str) -> Optional[T]:
        for c in self.index.chain(cls)[0]:
            if (c, method) in RETURN_TYPES:
                return T("obj", RETURN_TYPES[(c, method)])
        return None

    def _python_method_return(self, cls: str, method: str) -> Optional[T]:
        node = self.classes.get(cls)
        if node is not None:
            for stmt in node.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == method:
                    ann = _annotation_class(stmt.returns)
                    if ann and self.index.is_class(ann):
                        return T("obj", ann)
                    return None
            for base in self._python_bases(cls):
                if base in SCRIPTED_BASES and (SCRIPTED_BASES[base], method) in PYTHON_RETURN_TYPES:
                    return T("obj", PYTHON_RETURN_TYPES[(SCRIPTED_BASES[base], method)])
                if base in self.classes:
                    found = self._python_method_return(base, method)
                    if found:
                        return found
        return None

    def check_slicer_module(self, node: ast.AST, name: str) -> None:
        allowed = set(self.index.modules) | set(self.ctx.extension_modules) | {self.ctx.module_name.lower()}
        patterns = {self.ctx.module_name + "Widget", self.ctx.module_name + "Instance"}
        if name in allowed or name in patterns:
            self.ok(node, f"slicer.modules.{name}")
        else:
            self.error(node, f"slicer.modules.{name} is neither a Slicer {self.index.version} module nor one of "
                       f"this extension's dependencies ({', '.join(self.ctx.extension_modules) or 'none'})")


class _SlicerModulesAttr(ast.NodeVisitor):
    """Finds slicer.modules.<name> attribute accesses."""

    def __init__(self):
        self.found: List[Tuple[ast.AST, str]] = []

    def visit_Attribute(self, node: ast.Attribute) -> None:
        v = node.value
        if isinstance(v, ast.Attribute) and v.attr == "modules" and isinstance(v.value, ast.Name) and v.value.id == "slicer":
            self.found.append((node, node.attr))
        self.generic_visit(node)


def check_module_source(source: str, ctx: ModuleContext, index: Optional[ApiIndex] = None, filename: str = "<module>") -> Report:
    """Check a module's source; the report lists errors and every use that was verified."""
    index = index or load_index()
    tree = ast.parse(source, filename=filename)
    checker = _Checker(index, ctx, tree)
    for stmt in tree.body:
        checker.visit(stmt)
    finder = _SlicerModulesAttr()
    finder.visit(tree)
    for node, name in finder.found:
        checker.check_slicer_module(node, name)
    checker.report.errors.sort(key=lambda f: f.line)
    return checker.report


def check_module_file(path: Path, ctx: ModuleContext, index: Optional[ApiIndex] = None) -> Report:
    path = Path(path)
    return check_module_source(path.read_text(encoding="utf-8"), ctx, index, filename=str(path))
