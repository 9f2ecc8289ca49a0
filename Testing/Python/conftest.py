"""Shared test fixtures: paths to the data every test reads.

Everything tests read lives in Testing/Data (copied byte-identical from the
project's shared folder) or ships inside an installed package (slicerio's
chest CT and Slicer-written .seg.nrrd files), so the suite runs on any machine
that has only this repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep BLAS/torch from oversubscribing CI's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TESTING_DIR = Path(__file__).resolve().parents[1]
DATA_DIR = TESTING_DIR / "Data"
REPO_ROOT = TESTING_DIR.parent


def _slicerio_data() -> Path:
    import slicerio

    return Path(slicerio.__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return DATA_DIR / "mediround-tiny" / "model"


@pytest.fixture(scope="session")
def tiny_model_json(tiny_model_dir) -> Path:
    return tiny_model_dir / "model.json"


@pytest.fixture(scope="session")
def fixture_cases_dir() -> Path:
    return DATA_DIR / "mediround-tiny" / "cases"


@pytest.fixture(scope="session")
def slicer_api_json() -> Path:
    return DATA_DIR / "slicer" / "slicer_api.json"


@pytest.fixture(scope="session")
def ct_chest_path() -> Path:
    return _slicerio_data() / "CTChest4.nrrd"


@pytest.fixture(scope="session")
def slicer_segmentation_path() -> Path:
    return _slicerio_data() / "Segmentation.seg.nrrd"


@pytest.fixture(scope="session")
def slicer_overlapping_segmentation_path() -> Path:
    return _slicerio_data() / "SegmentationOverlapping.seg.nrrd"
