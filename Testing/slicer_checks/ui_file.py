"""Qt Designer .ui files: parse them and list their widgets."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Tuple


def ui_widgets(path: Path) -> Tuple[str, Dict[str, str]]:
    """(class of the top-level widget, {widget name: class}) of a .ui file; raises ET.ParseError if malformed."""
    root = ET.parse(str(path)).getroot()
    if root.tag != "ui":
        raise ValueError(f"{path}: not a Qt Designer file (root element <{root.tag}>)")
    top = root.find("widget")
    if top is None:
        raise ValueError(f"{path}: no top-level <widget>")
    widgets: Dict[str, str] = {}
    for w in root.iter("widget"):
        name, cls = w.get("name"), w.get("class")
        if not name or not cls:
            raise ValueError(f"{path}: a <widget> without name or class")
        if name in widgets:
            raise ValueError(f"{path}: widget name {name!r} is used twice")
        widgets[name] = cls
    return top.get("class"), widgets


def custom_widget_classes(path: Path) -> Dict[str, str]:
    """{class: extends} of the <customwidgets> section."""
    root = ET.parse(str(path)).getroot()
    out = {}
    for cw in root.iter("customwidget"):
        out[cw.findtext("class")] = cw.findtext("extends")
    return out
