"""The extension's CMake files list every file the module needs, and those files exist."""

from __future__ import annotations

import ast
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slicer_checks import paths  # noqa: E402
from slicer_checks.cmake import CMakeFile, keyword_args  # noqa: E402
from slicer_checks.imports import library_closure  # noqa: E402

REQUIRED_EXTENSION_VARS = [
    "EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
    "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS",
]


def installed_files(module_cmake: Path = paths.MODULE_CMAKE):
    """{path relative to qt-scripted-modules/: source file} for everything the module CMakeLists installs."""
    cm = CMakeFile(module_cmake)
    module_dir = module_cmake.resolve().parent
    out = {}
    for args in cm.call("slicerMacroBuildScriptedModule"):
        kw = keyword_args(args, ["NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"])
        assert "WITH_SUBDIR" not in kw, "WITH_SUBDIR would install into a sub-folder Slicer does not scan"
        for f in kw.get("SCRIPTS", []) + kw.get("RESOURCES", []):
            assert not f.startswith(".."), f"{f}: '..' paths are copied outside qt-scripted-modules/"
            out[f] = module_dir / f
    for args in cm.call("ctkMacroCompilePythonScript"):
        kw = keyword_args(args, ["TARGET_NAME", "SCRIPTS", "RESOURCES", "SOURCE_DIR", "DESTINATION_DIR", "INSTALL_DIR",
                                 "NO_INSTALL_SUBDIR", "GLOBAL_TARGET"])
        source_dir = Path(kw["SOURCE_DIR"][0]) if kw.get("SOURCE_DIR") else module_dir
        assert "NO_INSTALL_SUBDIR" in kw, "the library must install into qt-scripted-modules/ itself"
        assert kw.get("DESTINATION_DIR") and kw.get("INSTALL_DIR"), "destination and install folders are required"
        for f in kw.get("SCRIPTS", []) + kw.get("RESOURCES", []):
            assert not f.startswith(".."), f"{f}: '..' paths are copied outside qt-scripted-modules/"
            out[f] = source_dir / f
    return out, cm


def resources_used_by_module(script: Path = paths.MODULE_SCRIPT):
    """String arguments of _resourcePath(...) / self.resourcePath(...) calls in the module."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("_resourcePath", "resourcePath") and node.args and isinstance(node.args[0], ast.Constant):
                used.add("Resources/" + node.args[0].value)
    return used


def packaging_problems(module_cmake: Path, module_script: Path, repo: Path):
    """Everything the module needs that is missing on disk or from the CMake install lists."""
    problems = []
    installed, _cm = installed_files(module_cmake)
    for rel, src in installed.items():
        if not src.is_file():
            problems.append(f"listed but missing: {rel} ({src})")
    module_dir = module_script.parent
    needed = {module_script.name: module_script}
    for p in sorted(module_dir.rglob("*.py")):
        if "Testing" in p.relative_to(module_dir).parts:
            continue
        needed[p.relative_to(module_dir).as_posix()] = p
    for rel in resources_used_by_module(module_script):
        needed[rel] = repo / rel
    needed[f"Resources/Icons/{module_script.stem}.png"] = repo / "Resources" / "Icons" / f"{module_script.stem}.png"
    starts = [p for p in needed.values() if p.suffix == ".py"]
    for lib_file in library_closure(starts, repo):
        needed[lib_file.relative_to(repo).as_posix()] = lib_file
    for rel, src in needed.items():
        if not src.is_file():
            problems.append(f"needed but missing on disk: {rel}")
        if rel not in installed:
            problems.append(f"needed but not installed by the CMake files: {rel}")
    return problems


def test_module_files_exist_and_are_installed():
    problems = packaging_problems(paths.MODULE_CMAKE, paths.MODULE_SCRIPT, paths.REPO)
    assert not problems, "\n".join(problems)


def test_every_library_file_is_installed():
    installed, _ = installed_files()
    library = {p.relative_to(paths.REPO).as_posix() for p in paths.LIBRARY_DIR.rglob("*.py")}
    assert library, "no library files found"
    assert not (library - set(installed)), sorted(library - set(installed))


def test_library_data_tables_are_installed():
    installed, _ = installed_files()
    tables = {
        p.relative_to(paths.REPO).as_posix()
        for p in (paths.REPO / "Resources" / "Terminology").rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    assert not (tables - set(installed)), sorted(tables - set(installed))


def test_packaging_check_fails_on_missing_entries(tmp_path):
    # A copy of the module folder whose CMakeLists forgets the helper package and the .ui file.
    repo = tmp_path / "repo"
    shutil.copytree(paths.MODULE_DIR, repo / paths.MODULE_NAME, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(paths.LIBRARY_DIR, repo / "MultiTurnSegLib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(paths.REPO / "Resources", repo / "Resources")
    cmake = repo / paths.MODULE_NAME / "CMakeLists.txt"
    text = cmake.read_text()
    text = text.replace("  MultiTurnSegSupport/__init__.py\n", "").replace("  Resources/UI/${MODULE_NAME}.ui\n", "")
    cmake.write_text(text)
    problems = packaging_problems(cmake, repo / paths.MODULE_NAME / paths.MODULE_SCRIPT.name, repo)
    assert any("MultiTurnSegSupport/__init__.py" in p for p in problems), problems
    assert any("Resources/UI/MultiTurnSeg.ui" in p for p in problems), problems
    # and a library file the module imports but that is not installed:
    text = text.replace("${MULTITURNSEG_REPOSITORY_DIR}/MultiTurnSegLib/*.py", "${MULTITURNSEG_REPOSITORY_DIR}/MultiTurnSegLib/imaging/*.py")
    cmake.write_text(text)
    problems = packaging_problems(cmake, repo / paths.MODULE_NAME / paths.MODULE_SCRIPT.name, repo)
    assert any("MultiTurnSegLib/conversation/session.py" in p for p in problems), problems


def test_self_test_is_registered():
    _installed, cm = installed_files()
    assert ["SCRIPT", f"{paths.MODULE_NAME}.py"] in cm.call("slicer_add_python_unittest")
    tree = ast.parse(paths.MODULE_SCRIPT.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    test = classes.get(f"{paths.MODULE_NAME}Test")
    assert test is not None and any(getattr(b, "id", "") == "ScriptedLoadableModuleTest" for b in test.bases)
    assert {"runTest", "setUp"} <= {f.name for f in test.body if isinstance(f, ast.FunctionDef)}
    for suffix in ("", "Widget", "Logic"):
        assert f"{paths.MODULE_NAME}{suffix}" in classes


def test_root_cmake_has_extension_metadata():
    cm = CMakeFile(paths.ROOT_CMAKE)
    for var in REQUIRED_EXTENSION_VARS:
        assert cm.vars.get(var) and all(v.strip() for v in cm.vars[var]), f"{var} is not set"
    assert cm.vars["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert "PyTorch" in cm.vars["EXTENSION_DEPENDS"]
    assert ["MultiTurnSeg"] in cm.call("project")
    assert [paths.MODULE_NAME] in cm.call("add_subdirectory")
    assert cm.vars["EXTENSION_ICONURL"][0].endswith("/Resources/Icons/MultiTurnSeg.png")
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert all(re.match(r"^https://", u) for u in cm.vars[var]), var
    includes = [a[0] for a in cm.call("include")]
    assert len(includes) == 3  # Slicer_USE_FILE, EXTENSION_GENERATE_CONFIG, EXTENSION_CPACK


def test_icon_is_a_128_png():
    data = paths.ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


FAKE_SLICER_CONFIG = r"""
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseFakeSlicer.cmake)
"""
FAKE_USE_SLICER = r"""
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.13/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.13/qt-scripted-modules)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(BUILD_TESTING ON)
function(_record kind)
  file(APPEND ${CMAKE_BINARY_DIR}/calls.txt "${kind}|${CMAKE_CURRENT_SOURCE_DIR}|${ARGN}\n")
endfunction()
macro(slicerMacroBuildScriptedModule)
  _record(scripted ${ARGN})
endmacro()
macro(ctkMacroCompilePythonScript)
  _record(ctk ${ARGN})
endmacro()
macro(slicer_add_python_unittest)
  _record(unittest ${ARGN})
endmacro()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_with_a_stand_in_for_slicer(tmp_path):
    """Run the real CMake on the extension with stub Slicer macros; every listed file must exist."""
    fake = tmp_path / "fake-slicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(FAKE_SLICER_CONFIG)
    (fake / "UseFakeSlicer.cmake").write_text(FAKE_USE_SLICER)
    (fake / "empty.cmake").write_text("")
    build = tmp_path / "build"
    result = subprocess.run(
        ["cmake", "-S", str(paths.REPO), "-B", str(build), f"-DSlicer_DIR={fake}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [line.split("|", 2) for line in (build / "calls.txt").read_text().splitlines()]
    kinds = [c[0] for c in calls]
    assert kinds.count("scripted") == 1 and kinds.count("ctk") == 1 and kinds.count("unittest") == 1
    for kind, source_dir, args in calls:
        tokens = args.split(";")
        if kind == "ctk":
            source_dir = tokens[tokens.index("SOURCE_DIR") + 1]
        listed = [t for t in tokens if t.endswith((".py", ".ui", ".png", ".csv", ".json", ".tsv"))]
        for t in listed:
            assert os.path.isfile(os.path.join(source_dir, t)), f"{kind}: {t} not found in {source_dir}"
        if kind == "ctk":
            assert "MultiTurnSegLib/conversation/session.py" in listed
            assert "Resources/UI/MultiTurnSeg.ui" in listed
