"""The ExtensionsIndex catalog entry validates against Slicer's schema v1.0.2 and matches the CMake metadata."""

from __future__ import annotations

import copy
import json
import os
import sys
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slicer_checks import paths  # noqa: E402
from slicer_checks.cmake import CMakeFile  # noqa: E402

_TYPES = {"object": dict, "string": str, "array": list, "boolean": bool, "integer": int}


def schema_errors(instance, schema):
    """The subset of JSON Schema (draft 7) the catalog schema uses: type, required,
    additionalProperties: false, enum, minimum, maximum, items.type."""
    errors = []
    if not isinstance(instance, dict):
        return ["the entry must be a JSON object"]
    for key in schema.get("required", []):
        if key not in instance:
            errors.append(f"'{key}' is required")
    props = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        errors += [f"'{k}' is not allowed" for k in instance if k not in props]
    for key, value in instance.items():
        spec = props.get(key)
        if spec is None:
            continue
        expected = _TYPES[spec["type"]]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            errors.append(f"'{key}' must be {spec['type']}")
            continue
        if "enum" in spec and value not in spec["enum"]:
            errors.append(f"'{key}' must be one of {spec['enum']}")
        if "minimum" in spec and value < spec["minimum"]:
            errors.append(f"'{key}' must be >= {spec['minimum']}")
        if "maximum" in spec and value > spec["maximum"]:
            errors.append(f"'{key}' must be <= {spec['maximum']}")
        if spec["type"] == "array" and "items" in spec:
            item_type = _TYPES[spec["items"]["type"]]
            errors += [f"'{key}' items must be {spec['items']['type']}" for v in value if not isinstance(v, item_type)]
    return errors


@pytest.fixture(scope="module")
def schema():
    return json.loads(paths.CATALOG_SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def entry():
    return json.loads(paths.CATALOG_ENTRY.read_text(encoding="utf-8"))


def test_entry_validates(entry, schema):
    assert schema_errors(entry, schema) == []


def test_entry_validates_with_jsonschema(entry, schema):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(entry, schema)


BAD = {
    "missing scm_url": lambda e: e.pop("scm_url"),
    "missing category": lambda e: e.pop("category"),
    "unknown key": lambda e: e.update(homepage="x"),
    "tier out of range": lambda e: e.update(tier=7),
    "tier not an integer": lambda e: e.update(tier="1"),
    "bad scm_type": lambda e: e.update(scm_type="svn"),
    "dependency not a string": lambda e: e.update(build_dependencies=[1]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_validator_rejects(name, entry, schema):
    bad = copy.deepcopy(entry)
    BAD[name](bad)
    assert schema_errors(bad, schema), name
    try:
        import jsonschema
    except ImportError:
        return
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_entry_matches_cmake_and_index_rules(entry):
    cm = CMakeFile(paths.ROOT_CMAKE)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["category"] == cm.vars["EXTENSION_CATEGORY"][0]
    depends = [d for d in cm.vars["EXTENSION_DEPENDS"] if d != "NA"]
    assert sorted(entry.get("build_dependencies", [])) == sorted(depends)
    url = urllib.parse.urlsplit(entry["scm_url"])
    assert url.scheme in ("https", "git")
    repo_name = os.path.splitext(url.path.rstrip("/").split("/")[-1])[0]
    assert repo_name.startswith("Slicer"), "ExtensionsIndex: the repository name should start with 'Slicer'"
    assert not paths.CATALOG_ENTRY.stem.lower().startswith("slicer"), "the extension name should not start with 'Slicer'"
    assert paths.CATALOG_ENTRY.stem == cm.call("project")[0][0]
    assert b"\r" not in paths.CATALOG_ENTRY.read_bytes(), "ExtensionsIndex requires LF line endings"
