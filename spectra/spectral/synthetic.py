"""Matrices with prescribed singular values, for tests and examples (well- or ill-conditioned on demand)."""

from __future__ import annotations

import torch

from spectra.errors import SpectraError


def random_orthonormal(
    rows: int, cols: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols), from the QR of a Gaussian matrix."""
    if cols > rows:
        raise SpectraError(f"Cannot have {cols} orthonormal columns in dimension {rows}.")
    Q, R = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    # Fixing the signs of R's diagonal makes Q Haar-distributed rather than biased by QR's convention.
    return (Q * torch.sign(torch.diagonal(R))).to(dtype)


def matrix_with_singular_values(
    m: int, n: int, S: torch.Tensor, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A random (m, n) matrix U diag(S) V^T with Haar-random U, V and the given singular values S.

    Built in float64 and cast once, so the cast is the only rounding: e.g. S = logspace(0, -6, r)
    gives a float32 matrix with condition number about 1e6.
    """
    r = min(m, n)
    if S.shape != (r,):
        raise SpectraError(f"An ({m}, {n}) matrix has {r} singular values; got S of shape {tuple(S.shape)}.")
    U = random_orthonormal(m, r, generator)
    V = random_orthonormal(n, r, generator)
    return ((U * S.double()) @ V.T).to(dtype)
