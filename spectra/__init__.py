"""spectra: spectral diagnosis of sequential knowledge editing, with REVIVE built in."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from spectra.errors import SpectraError
from spectra.models import load_model
from spectra.spectral import Spectrum, ls, rank_for_energy, revive, ss, svd

__version__ = "0.1.0"

#: Imported on first use (``spectra.load_run``, ``spectra.plots``): matplotlib and pandas cost a second at import.
_LAZY = {"load_run": ("spectra.results", "load_run"), "Run": ("spectra.results", "Run"), "plots": ("spectra.plots", None)}

__all__ = ["Run", "SpectraError", "Spectrum", "load_model", "load_run", "ls", "plots", "rank_for_energy", "revive", "ss",
           "svd", "__version__"]


def __getattr__(name: str) -> Any:
    """``spectra.load_run``, ``spectra.Run`` and ``spectra.plots`` without importing them with the package."""
    if name not in _LAZY:
        raise AttributeError(f"module 'spectra' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    loaded = import_module(module)
    return loaded if attribute is None else getattr(loaded, attribute)
