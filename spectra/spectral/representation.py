"""Representation geometry and the relative change rate R_k (parameter-editing-limits paper).

Conventions, decided here once:
- Representations are (n_prompts, d) matrices, one hidden state per row.
- Principal directions u_k and scales sigma_k come from the SVD of the CENTRED original
  representations H0 - mean(H0): the mean is shared by every prompt and carries no per-prompt
  signal, so the signal scale along u_k is the spread around it, RMS = sigma_k / sqrt(n).
- The change H1 - H0 is NOT centred: a shift common to all prompts is a real change, and it is
  measured against that spread.
- Only the numerical rank of the centred H0 is used (sigma_k > max(n, d) * eps64 * sigma_1); beyond
  it the "directions" are round-off (a centred H0 with n <= d has rank at most n - 1), and a ratio
  to a zero scale would be meaningless.
- SVDs run in float64: hidden representations are very ill-conditioned (condition numbers above
  1e6 are reported), which float32 would not resolve.
"""

from __future__ import annotations

import torch

from spectra.errors import SpectraError
from spectra.spectral.decompose import check_matrix, svd
from spectra.spectral.spectrum import Spectrum, effective_rank


def _centred_spectrum(H: torch.Tensor, name: str) -> tuple[Spectrum, int]:
    """float64 SVD of H minus its row mean, and its numerical rank."""
    check_matrix(H, name)
    if H.shape[0] < 2:
        raise SpectraError(
            f"{name[0].upper()}{name[1:]} need at least 2 prompts (rows) to have a spread; got {H.shape[0]}."
        )
    H64 = H.detach().double()
    spectrum = svd(H64 - H64.mean(dim=0, keepdim=True), dtype=torch.float64)
    S = spectrum.S
    if S[0] == 0:
        raise SpectraError(f"All rows of {name} are identical, so it has no principal directions.")
    tol = max(H.shape) * torch.finfo(torch.float64).eps * S[0]
    return spectrum, int((S > tol).sum())


def relative_change_rate(H0: torch.Tensor, H1: torch.Tensor) -> torch.Tensor:
    """R_k for every principal direction u_k of the original representations, largest sigma first.

    c_k(p) = (h1_p - h0_p) . u_k is the change of prompt p along u_k; R_k is its RMS over the n
    prompts divided by that direction's own RMS sigma_k / sqrt(n), i.e. R_k = ||(H1 - H0) u_k|| / sigma_k.
    R_k >> 1 means the edit overwhelmed the original signal in that direction. Returns float64 of
    length equal to the numerical rank of the centred H0 (see the module docstring).
    """
    check_matrix(H0, "the original representations")
    check_matrix(H1, "the edited representations")
    if H0.shape != H1.shape:
        raise SpectraError(
            f"Original and edited representations must have the same shape (n_prompts, d), got "
            f"{tuple(H0.shape)} and {tuple(H1.shape)}: collect both on the same prompts and layer."
        )
    spectrum, rank = _centred_spectrum(H0, "the original representations")
    directions = spectrum.Vh[:rank]  # (rank, d): u_k as rows
    change = H1.detach().double().to(directions.device) - H0.detach().double().to(directions.device)
    return torch.linalg.vector_norm(change @ directions.T, dim=0) / spectrum.S[:rank]


def representation_geometry(H: torch.Tensor) -> dict[str, float]:
    """Geometry of representations H (n_prompts, d): the numbers of the paper's collapse table.

    Keys: ``n``, ``d``, ``numerical_rank``, ``effective_rank`` (Roy & Vetterli, over the centred
    spectrum), ``effective_rank_frac`` (effective rank / d), ``sigma_max``, ``sigma_min`` (smallest
    singular value within the numerical rank), ``condition_number`` (sigma_max / sigma_min).
    """
    spectrum, rank = _centred_spectrum(H, "the representations")
    S = spectrum.S[:rank]
    eff = effective_rank(S)
    return {
        "n": float(H.shape[0]),
        "d": float(H.shape[1]),
        "numerical_rank": float(rank),
        "effective_rank": eff,
        "effective_rank_frac": eff / H.shape[1],
        "sigma_max": float(S[0]),
        "sigma_min": float(S[-1]),
        "condition_number": float(S[0] / S[-1]),
    }
