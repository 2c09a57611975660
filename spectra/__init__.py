"""spectra: spectral diagnosis of sequential knowledge editing, with REVIVE built in."""

from spectra.errors import SpectraError
from spectra.models import load_model
from spectra.spectral import Spectrum, ls, rank_for_energy, revive, ss, svd

__version__ = "0.1.0"

__all__ = ["SpectraError", "Spectrum", "load_model", "ls", "rank_for_energy", "revive", "ss", "svd", "__version__"]
