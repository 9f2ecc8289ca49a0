"""The Slicer module calls only API that exists in Slicer 5.13 (checked against the API index, no Slicer needed)."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slicer_checks import paths  # noqa: E402
from slicer_checks.api_index import load_index  # noqa: E402
from slicer_checks.module_checker import ModuleContext, check_module_file, check_module_source  # noqa: E402
from slicer_checks.ui_file import ui_widgets  # noqa: E402


@pytest.fixture(scope="module")
def index():
    return load_index(str(paths.API_INDEX))


@pytest.fixture(scope="module")
def ctx():
    root, widgets = ui_widgets(paths.UI_FILE)
    extension_modules = [m for mods in paths.EXTENSION_MODULES.values() for m in mods]
    return ModuleContext(paths.MODULE_NAME, widgets, root, extension_modules)


@pytest.fixture(scope="module")
def report(index, ctx):
    return check_module_file(paths.MODULE_SCRIPT, ctx, index)


def test_index_is_slicer_5_13(index):
    assert index.version.startswith("5.13")


def test_module_uses_only_existing_slicer_api(report):
    assert not report.errors, "Slicer API problems in MultiTurnSeg.py:\n" + "\n".join(map(str, report.errors))


def test_the_calls_that_matter_were_checked(report):
    # If type tracking silently stopped working, these would no longer be verified.
    must = {
        "slicer.util.loadUI",
        "slicer.util.childWidgetVariables",
        "slicer.util.arrayFromVolume",
        "slicer.util.arrayFromSegmentBinaryLabelmap",
        "slicer.util.updateSegmentBinaryLabelmapFromArray",
        "slicer.util.pip_install",
        "slicer.util.confirmOkCancelDisplay",
        "slicer.util.saveScene",
        "slicer.util.loadScene",
        "slicer.modules.pytorchutils",
        "qSlicerApplication.layoutManager",
        "qSlicerLayoutManager.sliceWidget",
        "qMRMLSliceWidget.mrmlSliceNode",
        "vtkMRMLSliceNode.GetSliceToRAS",
        "vtkMatrix4x4.GetElement",
        "vtkMRMLScalarVolumeNode.GetIJKToRASMatrix",
        "vtkMRMLSegmentationNode.GetSegmentation",
        "vtkMRMLSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode",
        "vtkSegmentation.AddEmptySegment",
        "vtkSegmentation.RemoveSegment",
        "vtkSegmentation.GetSegment",
        "vtkSegment.SetTag",
        "vtkSegment.SetTerminology",
        "vtkMRMLScriptedModuleNode.SetParameter",
        "vtkMRMLScriptedModuleNode.GetParameter",
        "vtkMRMLScriptedModuleNode.SetNodeReferenceID",
        "vtkMRMLScene.AddNewNodeByClass",
        "SampleData.SampleDataLogic.downloadSample",
        "qSlicerScriptedLoadableModule.title",
        "vtkSegment.HasTag",
        "vtkSegment.GetName",
        "MultiTurnSegLogic.startPropagation",
        "MultiTurnSegLogic.runPropagationAndWait",
        "MultiTurnSegLogic._sliceNode",
        "vtkMRMLSliceNode.JumpSliceByCentering",
        "vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole",
    }
    missing = must - report.checked_names()
    assert not missing, f"not verified any more: {sorted(missing)}"


# --- background work never touches the scene -----------------------------------------

SCENE_NAMES = {"slicer", "qt", "vtk", "ctk"}


def background_scene_uses(source: str):
    """``(function, line, name)`` for every Slicer/Qt/VTK name or ``self`` method call inside the
    functions handed to ``support.BackgroundTask`` (they run in a worker thread)."""
    tree = ast.parse(source)
    functions = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef):
                functions.setdefault(node, {})[child.name] = child
    problems = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "BackgroundTask"):
            continue
        target = node.args[0] if node.args else None
        if not isinstance(target, ast.Name):
            problems.append(("?", node.lineno, "BackgroundTask needs a named local function"))
            continue
        fn = next((scope[target.id] for scope in functions.values() if target.id in scope), None)
        if fn is None:
            problems.append((target.id, node.lineno, "not found"))
            continue
        for inner in ast.walk(fn):
            if isinstance(inner, ast.Name) and inner.id in SCENE_NAMES:
                problems.append((fn.name, inner.lineno, inner.id))
            if (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute)
                    and isinstance(inner.func.value, ast.Name) and inner.func.value.id == "self"):
                problems.append((fn.name, inner.lineno, f"self.{inner.func.attr}()"))
    return problems


def test_background_tasks_do_not_touch_the_scene():
    source = paths.MODULE_SCRIPT.read_text(encoding="utf-8")
    assert source.count("support.BackgroundTask(") >= 3  # turn, test connection, propagation
    assert background_scene_uses(source) == []


def test_background_check_catches_scene_access():
    bad = textwrap.dedent("""
        def startX(self):
            def run(progress):
                node = slicer.mrmlScene.GetNodeByID("x")
                return self.volumeFromNode(node)
            return support.BackgroundTask(run).start()
        """)
    found = {name for _fn, _line, name in background_scene_uses(bad)}
    assert found == {"slicer", "self.volumeFromNode()"}


# --- the checker itself must fail on real mistakes ---------------------------------

HEADER = """
import qt, vtk, slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget
"""


def _errors(snippet, index, ctx):
    return [str(e) for e in check_module_source(HEADER + textwrap.dedent(snippet), ctx, index).errors]


BAD_SNIPPETS = {
    "unknown slicer.util function": "slicer.util.arrayFromSegmentMask(None, 'x')\n",
    "removed/nonexistent MRML method": """
        def f(segmentationNode: "vtkMRMLSegmentationNode"):
            return segmentationNode.GetBinaryLabelmapInternalRepresentationAsArray("x")
        """,
    "method on the wrong class (slice widget vs slice node)": """
        def f():
            sliceWidget = slicer.app.layoutManager().sliceWidget("Red")
            return sliceWidget.GetSliceToRAS()
        """,
    "method typo through a tracked return value": """
        def f(node: "vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            segmentation.AddEmptySegmnt("a")
        """,
    "untracked receiver of a VTK-style call": """
        def f(x):
            x.GetSegmentation()
        """,
    "unknown slicer.modules name": "slicer.modules.nosuchmodule.logic()\n",
    "unknown module in hasattr": "hasattr(slicer.modules, 'nosuchmodule')\n",
    "unknown class in annotation": """
        def f(n: "vtkMRMLNoSuchNode"):
            pass
        """,
    "unknown name imported from slicer.util": "from slicer.util import noSuchHelper\n",
    "unknown class from vtk": "m = vtk.vtkNoSuchMatrix()\n",
    "unknown class in AddNewNodeByClass": "slicer.mrmlScene.AddNewNodeByClass('vtkMRMLNoSuchNode')\n",
    "nonexistent property set on a module": """
        class M:
            pass
        def f(parent: "qSlicerScriptedLoadableModule"):
            parent.nosuchproperty = 1
        """,
    "widget missing from the .ui file": """
        class MultiTurnSegWidget(ScriptedLoadableModuleWidget):
            def setup(self):
                self.ui.noSuchButton.connect("clicked(bool)", self.setup)
        """,
    "self method missing from class and Slicer base": """
        class MultiTurnSegLogic(ScriptedLoadableModuleLogic):
            def f(self):
                return self.getParameterNodee()
        """,
    "Qt base method not in the short list": """
        def f():
            slicer.app.layoutManager().sliceWidget("Red").grabKeyboardFocusForever()
        """,
}


@pytest.mark.parametrize("name", sorted(BAD_SNIPPETS))
def test_checker_flags_mistake(name, index, ctx):
    assert _errors(BAD_SNIPPETS[name], index, ctx), f"the checker missed: {name}"


def test_checker_accepts_correct_snippet(index, ctx):
    good = """
        class MultiTurnSegLogic(ScriptedLoadableModuleLogic):
            def f(self, node: "vtkMRMLSegmentationNode", volume: "vtkMRMLScalarVolumeNode"):
                pn = self.getParameterNode()
                pn.SetParameter("a", "b")
                seg = node.GetSegmentation()
                sid = seg.AddEmptySegment("", "n", [1, 0, 0])
                seg.GetSegment(sid).SetTag("k", "v")
                m = vtk.vtkMatrix4x4()
                volume.GetIJKToRASMatrix(m)
                a = slicer.util.arrayFromSegmentBinaryLabelmap(node, sid, volume)
                w = slicer.app.layoutManager().sliceWidget("Red")
                w.mrmlSliceNode().GetSliceToRAS().GetElement(0, 2)
                slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode").CreateDefaultDisplayNodes()
                return hasattr(slicer.modules, "segmentations")
        """
    assert _errors(good, index, ctx) == []
