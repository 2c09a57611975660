"""Spectral linear algebra on weight matrices: SVD, energy, groups, perturbations, drift, REVIVE.

Pure tensor code: nothing here knows about models. Matrices are in (out, in) layout.
"""

from spectra.spectral.cache import SpectrumCache, default_cache_root, weights_fingerprint
from spectra.spectral.decompose import check_matrix, svd, svd_many
from spectra.spectral.delta import Delta
from spectra.spectral.spectrum import Spectrum, effective_rank, energy_share, rank_for_energy
from spectra.spectral.synthetic import matrix_with_singular_values, random_orthonormal

__all__ = [
    "Delta",
    "Spectrum",
    "SpectrumCache",
    "check_matrix",
    "default_cache_root",
    "effective_rank",
    "energy_share",
    "matrix_with_singular_values",
    "random_orthonormal",
    "rank_for_energy",
    "svd",
    "svd_many",
    "weights_fingerprint",
]
