"""Where the extension's files are (relative to the repository root)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_NAME = "MultiTurnSeg"
MODULE_DIR = REPO / MODULE_NAME
MODULE_SCRIPT = MODULE_DIR / f"{MODULE_NAME}.py"
SUPPORT_DIR = MODULE_DIR / "MultiTurnSegSupport"
UI_FILE = REPO / "Resources" / "UI" / f"{MODULE_NAME}.ui"
ICON_FILE = REPO / "Resources" / "Icons" / f"{MODULE_NAME}.png"
LIBRARY_DIR = REPO / "MultiTurnSegLib"
ROOT_CMAKE = REPO / "CMakeLists.txt"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
CATALOG_ENTRY = REPO / f"{MODULE_NAME}.json"
CATALOG_SCHEMA = Path(__file__).resolve().parent / "slicer-extension-catalog-entry-schema-v1.0.2.json"
API_INDEX = REPO / "Testing" / "Data" / "slicer" / "slicer_api.json"

# slicer.modules names provided by the extensions in EXTENSION_DEPENDS.
EXTENSION_MODULES = {"PyTorch": ["pytorchutils"]}
