"""Locate data files kept under the repository's ``Resources/`` folder.

The same tables serve three installs: a source checkout, the Slicer module
(Resources/ sits beside MultiTurnSegLib/), and a pip install (the tables are
shipped inside the package as ``MultiTurnSegLib/Resources``).
"""

from __future__ import annotations

from pathlib import Path

from .errors import MultiTurnSegError


def resource_path(*parts: str) -> Path:
    """Path of ``Resources/<parts...>``, wherever this library was installed."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "Resources", here / "Resources"]
    for base in candidates:
        path = base.joinpath(*parts)
        if path.exists():
            return path
    raise MultiTurnSegError(
        f"Resource file {'/'.join(parts)} is missing from this installation "
        f"(looked in {', '.join(str(c) for c in candidates)}); reinstall MultiTurnSeg."
    )
