"""REVIVE's dominant-subspace filter (paper Section 3.2, Eq. 6, Appendix D Algorithm 1)."""

from __future__ import annotations

from typing import overload

import torch

from spectra.errors import SpectraError
from spectra.spectral.decompose import check_matrix
from spectra.spectral.delta import Delta
from spectra.spectral.drift import MatrixOrSpectrum, as_spectrum
from spectra.spectral.spectrum import Indices, Spectrum, _as_index_tensor, check_tau, rank_for_energy


class ReviveProjector:
    """Exactly Eq. 6 of the REVIVE paper: dW_safe = sum_{i>k} sum_{j>k} alpha_ij u_i v_j^T, alpha = U^T dW V.

    Built once from the spectrum of the ORIGINAL weight W0 and the energy threshold tau in (0, 1);
    k is the smallest rank whose top-k singular values hold the share tau of the energy (Eq. 5).
    Zeroing every coefficient with i <= k or j <= k in the complete basis {u_i v_j^T} is the same as
    projecting both sides onto the complements of U_k = [u_1..u_k] and V_k = [v_1..v_k]:

        dW_safe = (I - U_k U_k^T) dW (I - V_k V_k^T),

    which is how it is computed: no m x m or n x n projector and no m x n coefficient matrix is ever
    formed. Dense updates cost O(m n k); factored updates A B^T stay factored,
    ((I - U_k U_k^T) A)((I - V_k V_k^T) B)^T, at O((m + n) k b).

    The projection runs in the projector's dtype (float32 or float64, from the spectrum), so a
    half-precision update is not projected with half-precision bases; the result is cast back to
    the update's dtype and device.
    """

    def __init__(self, spectrum: Spectrum, tau: float | None = None, *, indices: Indices | None = None) -> None:
        """Protect the top-k triplets at energy threshold ``tau`` (Eq. 5), or exactly the triplets ``indices``.

        ``indices`` is how other protection criteria (``spectra.spectral.protect``) choose the
        protected set; the filter itself is the same. An empty index set protects nothing.
        """
        if (tau is None) == (indices is None):
            raise SpectraError("A REVIVE projector protects either the top-k triplets at an energy threshold tau or "
                               "a given set of triplet indices: pass exactly one of them.")
        self.tau = None if tau is None else float(tau)
        if indices is None:
            idx = torch.arange(rank_for_energy(spectrum.S, self.tau))
        else:
            idx = _as_index_tensor(indices, spectrum.rank)
            if idx.unique().numel() != idx.numel():
                raise SpectraError("The protected triplet indices must be distinct.")
        self.indices = idx
        self.k = idx.numel()
        device_idx = idx.to(spectrum.U.device)
        self.Uk = spectrum.U[:, device_idx].contiguous()  # (m, k) protected output directions
        self.Vk = spectrum.Vh[device_idx].T.contiguous()  # (n, k) protected input directions

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the matrices this projector filters."""
        return (self.Uk.shape[0], self.Vk.shape[0])

    def _check(self, shape: tuple[int, int]) -> None:
        if tuple(shape) != self.shape:
            raise SpectraError(
                f"The update has shape {tuple(shape)} but the protected weight has shape {self.shape}; "
                "filter each update with the projector built from its own site's original weight."
            )

    def _bases(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.Uk.to(like.device), self.Vk.to(like.device)

    def _left(self, X: torch.Tensor, Uk: torch.Tensor) -> torch.Tensor:
        """(I - Uk Uk^T) X, computed as X - Uk (Uk^T X) in one fused multiply-subtract."""
        return torch.addmm(X, Uk, Uk.T @ X, alpha=-1.0)

    @overload
    def __call__(self, delta: torch.Tensor) -> torch.Tensor: ...

    @overload
    def __call__(self, delta: Delta) -> Delta: ...

    def __call__(self, delta: torch.Tensor | Delta) -> torch.Tensor | Delta:
        """The safe update of ``delta``, of the same kind (dense Tensor or Delta, factored stays factored)."""
        if isinstance(delta, Delta):
            self._check(delta.shape)
            if not delta.is_factored:
                return Delta.of(self(delta.dense))
            A, B = delta.left, delta.right
            work = self.Uk.dtype
            Uk, Vk = self._bases(A)
            return Delta.factored(
                self._left(A.to(work), Uk).to(A.dtype), self._left(B.to(work), Vk).to(B.dtype)
            )
        check_matrix(delta, "the update")
        self._check(tuple(delta.shape))
        Uk, Vk = self._bases(delta)
        X = self._left(delta.to(self.Uk.dtype), Uk)
        # Right projection applied to the left-projected update: (I - UkUk^T) dW (I - VkVk^T), equal
        # to dW - Uk(Uk^T dW) - (dW Vk)Vk^T + Uk(Uk^T dW Vk)Vk^T but with two products fewer.
        return torch.addmm(X, X @ Vk, Vk.T, alpha=-1.0).to(delta.dtype)

    def leakage(self, delta: torch.Tensor | Delta) -> dict[str, float]:
        """How much of an update touches the protected subspace: ||Uk^T dW||_F / ||dW||_F and ||dW Vk||_F / ||dW||_F.

        Zero (to round-off) for a filtered update; worth logging per round for unfiltered arms.
        """
        d = delta if isinstance(delta, Delta) else Delta.of(delta)
        self._check(d.shape)
        work = self.Uk.dtype
        d = d.to(dtype=work)
        total = d.frobenius_norm()
        if total == 0.0:
            return {"left": 0.0, "right": 0.0}
        if d.is_factored:
            Uk, Vk = self._bases(d.left)
            left = Delta.factored(Uk.T @ d.left, d.right).frobenius_norm()
            right = Delta.factored(d.left, Vk.T @ d.right).frobenius_norm()
        else:
            Uk, Vk = self._bases(d.dense)
            left = float(torch.linalg.matrix_norm(Uk.T @ d.dense))
            right = float(torch.linalg.matrix_norm(d.dense @ Vk))
        return {"left": left / total, "right": right / total}


def revive(W: MatrixOrSpectrum, dW: torch.Tensor, tau: float) -> torch.Tensor:
    """REVIVE-filter a dense update dW of the original weight W at energy threshold tau (Eq. 6).

    Decomposes W each call; to filter many updates of one weight, build a ReviveProjector once.
    """
    check_tau(tau)  # before the SVD, which may take minutes
    return ReviveProjector(as_spectrum(W, "the original weight"), tau)(dW)
