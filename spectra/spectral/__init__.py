"""Spectral linear algebra on weight matrices: SVD, energy, groups, perturbations, drift, REVIVE.

Pure tensor code: nothing here knows about models. Matrices are in (out, in) layout.
"""

from spectra.spectral.cache import SpectrumCache, default_cache_root, weights_fingerprint
from spectra.spectral.decompose import check_matrix, svd, svd_many
from spectra.spectral.delta import Delta
from spectra.spectral.drift import (
    as_spectrum, drift_stats, functional_change, ls, spectrum_table, ss, ss_best_match, ss_diagonal, ss_summary,
)
from spectra.spectral.perturb import group_perturbation
from spectra.spectral.protect import (
    CRITERIA, Protection, activation_scores, complement_usage, fisher_scores, gradient_coefficients, matching_tau,
)
from spectra.spectral.representation import relative_change_rate, representation_geometry
from spectra.spectral.revive import ReviveProjector, revive
from spectra.spectral.spectrum import Spectrum, effective_rank, energy_share, rank_for_energy
from spectra.spectral.synthetic import matrix_with_singular_values, random_orthonormal

__all__ = [
    "CRITERIA",
    "Delta",
    "Protection",
    "ReviveProjector",
    "Spectrum",
    "SpectrumCache",
    "activation_scores",
    "as_spectrum",
    "check_matrix",
    "complement_usage",
    "default_cache_root",
    "drift_stats",
    "effective_rank",
    "fisher_scores",
    "functional_change",
    "gradient_coefficients",
    "energy_share",
    "group_perturbation",
    "ls",
    "matching_tau",
    "matrix_with_singular_values",
    "random_orthonormal",
    "rank_for_energy",
    "relative_change_rate",
    "representation_geometry",
    "revive",
    "spectrum_table",
    "ss",
    "ss_best_match",
    "ss_diagonal",
    "ss_summary",
    "svd",
    "svd_many",
    "weights_fingerprint",
]
