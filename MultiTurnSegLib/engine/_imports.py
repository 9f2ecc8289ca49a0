"""Third-party imports that need care.

segment-anything's package root imports torchvision (for its predictor), and
transformers picks torchvision-backed image code whenever torchvision is
importable; both break where torchvision is missing or broken. The engine needs
neither: it uses segment-anything's ``modeling`` classes only and the PIL CLIP
image processor.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from ..errors import ModelLoadError

# segment_anything/modeling is imported under this private package name so the
# real package root (and its torchvision import) never runs and a later
# ``import segment_anything`` elsewhere still gets the genuine package.
_SAM_ALIAS = "_multiturnseg_segment_anything"


def hide_broken_torchvision() -> None:
    """Make a torchvision that cannot be imported invisible to transformers.

    Must run before transformers is first imported; harmless afterwards.
    """
    if "torchvision" in sys.modules or "transformers" in sys.modules:
        return
    try:
        if importlib.util.find_spec("torchvision") is None:
            return
    except (ImportError, ValueError):
        return
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - any failure means "unusable"
        # A None entry makes find_spec() report the package as absent.
        sys.modules["torchvision"] = None  # type: ignore[assignment]


def sam_modeling():
    """segment_anything.modeling, loaded without the package root."""
    loaded = sys.modules.get("segment_anything.modeling")
    if loaded is not None:
        return loaded
    loaded = sys.modules.get(_SAM_ALIAS + ".modeling")
    if loaded is not None:
        return loaded
    try:
        spec = importlib.util.find_spec("segment_anything")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The 'segment-anything' package is not installed; install the engine "
            "extra: pip install 'multiturnseg[engine]'."
        )
    package = types.ModuleType(_SAM_ALIAS)
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = _SAM_ALIAS
    sys.modules[_SAM_ALIAS] = package
    return importlib.import_module(_SAM_ALIAS + ".modeling")
