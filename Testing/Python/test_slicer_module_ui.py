"""The panel's .ui file parses and holds every widget the module uses."""

from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slicer_checks import paths  # noqa: E402
from slicer_checks.api_index import load_index  # noqa: E402
from slicer_checks.ui_file import custom_widget_classes, ui_widgets  # noqa: E402


def ui_names_used(source: str):
    """Names X of every ``self.ui.X`` (or ``widget.ui.X``) in the module."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            names.add(node.attr)
    return names


def missing_widgets(source: str, ui_path: Path):
    _root, widgets = ui_widgets(ui_path)
    return sorted(ui_names_used(source) - set(widgets))


def test_ui_file_parses():
    root_class, widgets = ui_widgets(paths.UI_FILE)
    assert root_class == "qMRMLWidget"
    assert widgets[paths.MODULE_NAME] == "qMRMLWidget"


def test_every_used_widget_exists():
    source = paths.MODULE_SCRIPT.read_text(encoding="utf-8")
    assert len(ui_names_used(source)) > 20
    assert missing_widgets(source, paths.UI_FILE) == []


def test_widget_check_fails_on_a_missing_widget():
    assert missing_widgets("self.ui.sendButton.click()\nself.ui.noSuchWidget.show()\n", paths.UI_FILE) == ["noSuchWidget"]


def test_malformed_ui_fails(tmp_path):
    bad = tmp_path / "bad.ui"
    bad.write_text('<ui version="4.0"><widget class="qMRMLWidget" name="X"><layout></widget></ui>')
    with pytest.raises(ET.ParseError):
        ui_widgets(bad)
    dup = tmp_path / "dup.ui"
    dup.write_text('<ui version="4.0"><widget class="qMRMLWidget" name="X"><widget class="QLabel" name="a"/>'
                   '<widget class="QLabel" name="a"/></widget></ui>')
    with pytest.raises(ValueError):
        ui_widgets(dup)


def test_slicer_widget_classes_exist_and_are_declared():
    index = load_index(str(paths.API_INDEX))
    _root, widgets = ui_widgets(paths.UI_FILE)
    custom = custom_widget_classes(paths.UI_FILE)
    for name, cls in widgets.items():
        if cls.startswith(("q", "ctk")):
            assert index.is_class(cls), f"{name}: {cls} is not a Slicer/CTK class"
            assert cls in custom, f"{cls} must be declared in <customwidgets>"


def test_panel_has_the_required_controls():
    _root, widgets = ui_widgets(paths.UI_FILE)
    assert widgets["inputVolumeSelector"] == widgets["segmentationSelector"] == "qMRMLNodeComboBox"
    assert widgets["modelPathLineEdit"] == "ctkPathLineEdit"
    for name in ["sliceViewSelector", "windowPresetSelector", "chatHistoryTable", "promptLineEdit", "referenceSelector",
                 "undoButton", "newConversationButton", "exportButton", "exportFormatSelector", "deviceSelector",
                 "workerUrlLineEdit", "workerTokenLineEdit", "testConnectionButton", "installDependenciesButton",
                 "progressBar", "cancelButton", "statusLabel", "propagateButton"]:
        assert name in widgets, name
    assert widgets["propagateFirstSliceSpinBox"] == widgets["propagateLastSliceSpinBox"] == "QSpinBox"
    tree = ET.parse(str(paths.UI_FILE)).getroot()
    views = [item.findtext("property/string") for item in tree.find(".//widget[@name='sliceViewSelector']").findall("item")]
    assert views == ["Red", "Yellow", "Green"]
    receivers = {c.findtext("receiver") for c in tree.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert {"inputVolumeSelector", "segmentationSelector"} <= receivers


def test_propagate_controls_explain_what_they_do():
    tree = ET.parse(str(paths.UI_FILE)).getroot()

    def tooltip(name):
        widget = tree.find(f".//widget[@name='{name}']")
        return next(p.findtext("string") for p in widget.findall("property") if p.get("name") == "toolTip")

    button = tooltip("propagateButton")
    assert "each slice" in button and "independent 2D prediction" in button
    assert tooltip("propagateFirstSliceSpinBox") and tooltip("propagateLastSliceSpinBox")
    # the row sits in the conversation section, above the shared progress bar
    chat = tree.find(".//widget[@name='chatCollapsibleButton']")
    names = [w.get("name") for w in chat.iter("widget")]
    assert names.index("promptLineEdit") < names.index("propagateButton") < names.index("progressBar")
