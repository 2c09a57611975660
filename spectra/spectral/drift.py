"""Spectral drift of an edited matrix: LS and SS (paper Section 2.3), norm growth, spectrum tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from spectra.errors import SpectraError
from spectra.spectral.decompose import check_matrix, svd
from spectra.spectral.spectrum import Indices, Spectrum, _as_index_tensor, _rank_for_share, rank_for_energy

MatrixOrSpectrum = torch.Tensor | Spectrum
Side = Literal["right", "left"]


def as_spectrum(W: MatrixOrSpectrum, name: str = "the matrix") -> Spectrum:
    """W itself if it is already a Spectrum, else its SVD, so callers holding spectra never re-decompose."""
    if isinstance(W, Spectrum):
        return W
    check_matrix(W, name)
    return svd(W)


def _same_shape(s0: Spectrum, st: Spectrum) -> None:
    if s0.shape != st.shape:
        raise SpectraError(
            f"The original and the edited matrix must have the same shape, got {s0.shape} and {st.shape}."
        )


def _frobenius_inner(a: Spectrum, b: Spectrum) -> torch.Tensor:
    """<Ua Sa Vha, Ub Sb Vhb>_F in the singular bases: sum((Sa[:, None] * Ua^T Ub * Sb) * (Vha Vhb^T))."""
    return torch.sum((a.S[:, None] * (a.U.T @ b.U) * b.S[None, :]) * (a.Vh @ b.Vh.T))


def ls(W0: MatrixOrSpectrum, Wt: MatrixOrSpectrum, tau: float = 0.10) -> float:
    """Low-rank Subspace Similarity (Eq. 3): cosine of the top-tau-energy reconstructions of W0 and Wt.

    Each matrix is reconstructed from its OWN top components reaching the share ``tau`` in (0, 1] of
    its energy. Inner products are taken in the singular bases (cost O((m + n) k^2), no (m, n)
    reconstruction is formed), the norms too rather than as ||S_top||, so that the float32 vectors'
    small departures from orthonormality cancel and LS(W, W) = 1 to float64 round-off.
    """
    s0, st = as_spectrum(W0, "the original matrix"), as_spectrum(Wt, "the edited matrix")
    _same_shape(s0, st)
    a = s0.top(_rank_for_share(s0.S, float(tau))).to(dtype=torch.float64)
    b = st.top(_rank_for_share(st.S, float(tau))).to(device=s0.U.device, dtype=torch.float64)
    inner = _frobenius_inner(a, b)
    return float(inner / torch.sqrt(_frobenius_inner(a, a) * _frobenius_inner(b, b)))


def ss(
    W0: MatrixOrSpectrum,
    Wt: MatrixOrSpectrum,
    k: int | None = None,
    tau: float = 0.10,
    side: Side = "right",
) -> torch.Tensor:
    """Singular Vector Similarity (Sec. 2.3; left side App. F.3): a (k, r) matrix of |cos| angles.

    Row i holds |<x_i(Wt), x_j(W0)>| for every original singular vector j = 1..r, where x are the
    right singular vectors v (side="right", as in the paper's main text) or the left ones u
    (side="left"). Absolute values because singular vectors are defined only up to sign.
    ``k`` defaults to the dominant rank of W0: rank_for_energy(S0, tau).
    """
    if side not in ("right", "left"):
        raise SpectraError(f"side must be 'right' (input vectors v) or 'left' (output vectors u), got {side!r}.")
    s0, st = as_spectrum(W0, "the original matrix"), as_spectrum(Wt, "the edited matrix")
    _same_shape(s0, st)
    if k is None:
        k = rank_for_energy(s0.S, tau)
    if not 1 <= k <= st.rank:
        raise SpectraError(f"k must lie in 1..{st.rank} (the number of singular vectors), got {k}.")
    if side == "right":
        return (st.Vh[:k].to(s0.Vh) @ s0.Vh.T).abs()
    return (st.U[:, :k].T.to(s0.U) @ s0.U).abs()


def ss_best_match(W0: MatrixOrSpectrum, Wt: MatrixOrSpectrum, k: int | Indices, side: Side = "right") -> float:
    """min over W0's top-k singular vectors (or those at the indices ``k``) of their best |cos| with ANY vector of Wt.

    The SS diagonal asks that W0's i-th vector still be Wt's i-th; this asks only that it still be
    one of Wt's singular vectors, at any rank. It stays 1 when an update larger than W0 pushes
    intact triplets down the spectrum, where the diagonal drops to about 0.
    """
    if isinstance(k, int):
        # ss with the roles swapped: row i holds W0's i-th vector against every vector of Wt, so only
        # k rows are formed (a k x r product, not r x r).
        return float(ss(Wt, W0, k=k, side=side).max(dim=1).values.min())
    s0, st = as_spectrum(W0, "the original matrix"), as_spectrum(Wt, "the edited matrix")
    _same_shape(s0, st)
    idx = _as_index_tensor(k, s0.rank).to(s0.U.device)
    if side == "right":
        matrix = s0.Vh[idx] @ st.Vh.to(s0.Vh).T
    else:
        matrix = s0.U[:, idx].T @ st.U.to(s0.U)
    return float(matrix.abs().max(dim=1).values.min())


def ss_diagonal(W0: MatrixOrSpectrum, Wt: MatrixOrSpectrum, indices: Indices, side: Side = "right") -> torch.Tensor:
    """SS[i, i] = |cos(x_i(Wt), x_i(W0))| at the given indices only: whether those triplets kept their place."""
    s0, st = as_spectrum(W0, "the original matrix"), as_spectrum(Wt, "the edited matrix")
    _same_shape(s0, st)
    idx = _as_index_tensor(indices, s0.rank).to(s0.U.device)
    if side == "right":
        return (s0.Vh[idx] * st.Vh[idx.to(st.Vh.device)].to(s0.Vh)).sum(dim=1).abs()
    return (s0.U[:, idx] * st.U[:, idx.to(st.U.device)].to(s0.U)).sum(dim=0).abs()


def ss_summary(matrix: torch.Tensor) -> dict[str, float]:
    """Scalar summaries of an SS matrix (k, r), the numbers one tracks per editing round.

    - ``diag_mean``, ``diag_min``: |cos| between the i-th new and the i-th original vector, i <= k.
    - ``row_max_mean``, ``row_max_min``: each new vector's best match among all original vectors
      (the paper's "maximum SS"); 1 means it is still some original singular vector.
    - ``argmax_match``: share of the k new vectors whose best match is their own index.
    - ``subspace_overlap``: mean squared mass of a new vector inside the original top-k subspace,
      sum_{j<=k} cos^2; 1 means the dominant subspace survived even if vectors rotated inside it.
    """
    if matrix.ndim != 2 or matrix.shape[0] > matrix.shape[1] or matrix.shape[0] == 0:
        raise SpectraError(f"Expected an SS matrix of shape (k, r) with 1 <= k <= r, got {tuple(matrix.shape)}.")
    m = matrix.detach().double().abs()
    k = m.shape[0]
    diag = torch.diagonal(m[:, :k])
    row_max, argmax = m.max(dim=1)
    return {
        "k": float(k),
        "diag_mean": float(diag.mean()),
        "diag_min": float(diag.min()),
        "row_max_mean": float(row_max.mean()),
        "row_max_min": float(row_max.min()),
        "argmax_match": float((argmax == torch.arange(k, device=m.device)).double().mean()),
        "subspace_overlap": float((m[:, :k] ** 2).sum(dim=1).mean()),
    }


def drift_stats(
    W0: torch.Tensor,
    Wt: torch.Tensor,
    *,
    spectrum0: Spectrum | None = None,
    spectrum_t: Spectrum | None = None,
) -> dict[str, float]:
    """Norm growth and conditioning of an edited matrix against its original.

    The difference norm is taken from the matrices themselves (exact even for tiny edits); the
    spectral quantities from the given spectra, which are computed only when not passed in.
    """
    check_matrix(W0, "the original matrix")
    check_matrix(Wt, "the edited matrix")
    if W0.shape != Wt.shape:
        raise SpectraError(
            "The original and the edited matrix must have the same shape, got "
            f"{tuple(W0.shape)} and {tuple(Wt.shape)}."
        )
    s0 = spectrum0 if spectrum0 is not None else svd(W0)
    st = spectrum_t if spectrum_t is not None else svd(Wt)
    fro0 = float(torch.linalg.matrix_norm(W0.double()))
    frot = float(torch.linalg.matrix_norm(Wt.double()))
    delta = Wt.double() - W0.to(Wt.device).double()
    diff = float(torch.linalg.matrix_norm(delta))
    return {
        "delta_spectral_rel": float(torch.linalg.matrix_norm(delta, ord=2)) / s0.spectral_norm,
        "spectral_norm_ratio": st.spectral_norm / s0.spectral_norm,
        "fro_norm_0": fro0,
        "fro_norm_t": frot,
        "fro_ratio": frot / fro0,
        "delta_fro": diff,
        "delta_fro_rel": diff / fro0,
        "spectral_norm_0": s0.spectral_norm,
        "spectral_norm_t": st.spectral_norm,
        "condition_number_0": s0.condition_number,
        "condition_number_t": st.condition_number,
        "effective_rank_0": s0.effective_rank,
        "effective_rank_t": st.effective_rank,
    }


def functional_change(W0: torch.Tensor, Wt: torch.Tensor, keys: torch.Tensor) -> float:
    """RMS over input vectors of ||(Wt - W0) k|| / RMS of ||W0 k||: how much an update changes the outputs.

    ``keys`` (in, n) are inputs the matrix really sees (e.g. MLP keys of corpus tokens). Unlike the
    Frobenius ratio this ignores input directions no input uses, where a ridge-limited update can
    be large without changing anything the model computes (``shared/reference/editing-regime.md``).
    """
    check_matrix(W0, "the original matrix")
    if keys.ndim != 2 or keys.shape[0] != W0.shape[1] or keys.shape[1] == 0:
        raise SpectraError(f"keys must be (in={W0.shape[1]}, n > 0) input vectors, got shape {tuple(keys.shape)}.")
    K = keys.to(device=W0.device, dtype=torch.float64)
    base = float(torch.linalg.matrix_norm(W0.double() @ K))
    if base == 0:
        raise SpectraError("The original matrix maps every given key to zero; the functional change is undefined.")
    return float(torch.linalg.matrix_norm((Wt.double() - W0.to(Wt.device).double()) @ K.to(Wt.device))) / base


def spectrum_table(spectrum: Spectrum, taus: Sequence[float] = (0.05, 0.1, 0.2, 0.3)) -> dict[str, float]:
    """One row describing a spectrum: shape, dominant rank k and k / r per tau, norms, conditioning.

    Keys: ``m``, ``n``, ``rank`` (r = min(m, n)), ``k@<tau>``, ``k_frac@<tau>`` (k / r),
    ``fro_norm``, ``spectral_norm``, ``condition_number``, ``effective_rank``.
    """
    m, n = spectrum.shape
    row: dict[str, float] = {"m": m, "n": n, "rank": spectrum.rank}
    for tau in taus:
        k = spectrum.rank_for(tau)
        row[f"k@{tau:g}"] = k
        row[f"k_frac@{tau:g}"] = k / spectrum.rank
    row.update(
        fro_norm=spectrum.fro_norm,
        spectral_norm=spectrum.spectral_norm,
        condition_number=spectrum.condition_number,
        effective_rank=spectrum.effective_rank,
    )
    return row
