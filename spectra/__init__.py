"""spectra: spectral diagnosis of sequential knowledge editing, with REVIVE built in."""

from spectra.errors import SpectraError
from spectra.models import load_model

__version__ = "0.1.0"

__all__ = ["SpectraError", "load_model", "__version__"]
