"""Checks of the Slicer extension that run without Slicer (used by Testing/Python/test_slicer_module_*.py)."""
