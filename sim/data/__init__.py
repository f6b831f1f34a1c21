"""Bundled data files (trace slices, length samples) and their licences; see ATTRIBUTION.md."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_path(name: str) -> Path:
    """Filesystem path of a bundled data file, raising ValueError if it is not shipped."""
    # the package is installed unzipped (setuptools default), so the resource is a real file
    path = Path(str(resources.files(__name__).joinpath(name)))
    if not path.is_file():
        raise ValueError(f"bundled data file {name!r} is missing from {path.parent}; reinstall tokenstep")
    return path
