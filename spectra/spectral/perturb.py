"""Structured perturbations of one energy group of singular directions (paper Eq. 2 and App. F.1)."""

from __future__ import annotations

from typing import Literal

import torch

from spectra.errors import SpectraError
from spectra.spectral.spectrum import Indices, Spectrum, _as_index_tensor

Side = Literal["input", "output"]


def group_perturbation(
    spectrum: Spectrum,
    group_indices: Indices,
    side: Side,
    eps: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """A random remap of one group's singular directions, scaled to Frobenius norm exactly ``eps``.

    input side (Eq. 2):   Delta = sum_{j in G} sum_{i=1..r} alpha_ij u_i v_j^T = U A Vh[G]
    output side (F.1):    Delta = sum_{i in G} sum_{j=1..r} beta_ij u_i v_j^T  = U[:, G] B Vh
    with alpha, beta ~ N(0, 1) drawn from ``generator`` (on the generator's device), then
    Delta <- eps * Delta / ||Delta||_F. ``eps`` is absolute; scaling it to ||W||_F is the caller's choice.
    """
    if side not in ("input", "output"):
        raise SpectraError(f"side must be 'input' (Eq. 2) or 'output' (Appendix F.1), got {side!r}.")
    if not (eps >= 0.0 and eps < float("inf")):
        raise SpectraError(f"The perturbation strength eps must be a finite number >= 0, got {eps!r}.")
    group = _as_index_tensor(group_indices, spectrum.rank)
    if group.numel() == 0:
        raise SpectraError(
            "The energy group is empty: a single singular value holds more energy than the group's "
            "width, so no direction starts inside it. Skip empty groups (see Spectrum.groups)."
        )
    group = group.to(spectrum.U.device)
    U, Vh, r = spectrum.U, spectrum.Vh, spectrum.rank
    shape = (r, group.numel()) if side == "input" else (group.numel(), r)
    coeffs = torch.randn(shape, generator=generator, dtype=U.dtype, device=generator.device).to(U.device)
    # Two thin products: (m x r)(r x g)(g x n) or (m x g)(g x r)(r x n), never an r x r loop.
    delta = U @ (coeffs @ Vh[group]) if side == "input" else (U[:, group] @ coeffs) @ Vh
    # Normalise by the norm of the matrix actually built (not ||coeffs||_F, equal only up to the
    # orthonormality of U and V) so the result has norm eps to round-off.
    return delta * (eps / torch.linalg.matrix_norm(delta))
