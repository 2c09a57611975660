"""Spectrum: the thin SVD of one (out, in) matrix and what the REVIVE paper derives from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spectra.errors import SpectraError

Indices = torch.Tensor | Sequence[int]


def energy_share(S: torch.Tensor) -> torch.Tensor:
    """Cumulative energy share of the top-1, top-2, ... singular values (paper Eq. 5).

    Energy is the sum of singular values, not of their squares, as in the paper. Computed in float64
    so that the last share is 1 to round-off and thresholds compare reliably.
    """
    S64 = _checked_singular_values(S)
    return torch.cumsum(S64, 0) / S64.sum()


def rank_for_energy(S: torch.Tensor, tau: float) -> int:
    """Smallest k whose top-k singular values hold at least the share ``tau`` of the energy (Eq. 5).

    ``tau`` must lie strictly inside (0, 1), as REVIVE's threshold does.
    """
    check_tau(tau)
    return _rank_for_share(S, float(tau))


def check_tau(tau: float) -> None:
    """Raise SpectraError unless the energy threshold tau lies strictly inside (0, 1)."""
    if not 0.0 < float(tau) < 1.0:
        raise SpectraError(
            f"The energy threshold tau must lie strictly between 0 and 1, but it is {tau!r}. tau is the "
            "share of singular-value energy held by the protected top-k directions (the paper uses "
            "values such as 0.05 to 0.3); 0 would protect nothing and 1 everything."
        )


def _rank_for_share(S: torch.Tensor, share: float) -> int:
    """Smallest k with cumulative share >= ``share`` for any share in (0, 1]; 1 means all."""
    if not 0.0 < share <= 1.0:
        raise SpectraError(
            f"The energy fraction must lie in (0, 1], but it is {share!r}: it is the share of "
            "singular-value energy to keep, for example 0.05 for the top 5 %."
        )
    shares = energy_share(S)
    # searchsorted finds the first share >= the threshold; the clamp covers a last share that
    # round-off leaves a hair below 1.
    k = int(torch.searchsorted(shares, torch.tensor([share], dtype=shares.dtype)).item()) + 1
    return min(k, shares.numel())


def _checked_singular_values(S: torch.Tensor) -> torch.Tensor:
    """S as float64, after checking it is a non-empty 1-D vector with positive total energy."""
    if S.ndim != 1 or S.numel() == 0:
        raise SpectraError(f"Singular values must be a non-empty 1-D tensor, got shape {tuple(S.shape)}.")
    S64 = S.detach().to(dtype=torch.float64, device="cpu")
    if not torch.isfinite(S64).all() or (S64 < 0).any():
        raise SpectraError("Singular values must be finite and non-negative; these are not.")
    if S64.sum() == 0:
        raise SpectraError(
            "The matrix is zero, so it has no singular-value energy to share out: energy thresholds, "
            "groups and dominant subspaces are undefined for it. Check that the right weight was read."
        )
    return S64


def _as_index_tensor(indices: Indices, r: int) -> torch.Tensor:
    """Indices as a 1-D long tensor on the CPU, checked against the number of singular values r."""
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
    if idx.numel() and (idx.min() < 0 or idx.max() >= r):
        raise SpectraError(
            f"Singular-value indices must lie in 0..{r - 1} for this spectrum; got "
            f"{idx.min().item()}..{idx.max().item()}."
        )
    return idx


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Thin SVD W = U diag(S) Vh of an (m, n) matrix in (out, in) layout, r = min(m, n).

    ``U`` (m, r): output directions u_i as columns; ``S`` (r,): singular values, descending;
    ``Vh`` (r, n): input directions v_i as rows. Equality is by identity (tensors have no truth value).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def __post_init__(self) -> None:
        m, r = self.U.shape
        if self.S.shape != (r,) or self.Vh.shape[0] != r or self.Vh.ndim != 2:
            raise SpectraError(
                f"Inconsistent SVD factors: U {tuple(self.U.shape)}, S {tuple(self.S.shape)}, "
                f"Vh {tuple(self.Vh.shape)}; expected (m, r), (r,), (r, n)."
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the decomposed matrix."""
        return (self.U.shape[0], self.Vh.shape[1])

    @property
    def rank(self) -> int:
        """r = min(m, n), the number of singular values (not the numerical rank)."""
        return self.S.numel()

    @property
    def V(self) -> torch.Tensor:
        """(n, r): input directions v_i as columns."""
        return self.Vh.T

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Spectrum":
        """The same spectrum on another device or in another dtype."""
        return Spectrum(
            self.U.to(device=device, dtype=dtype),
            self.S.to(device=device, dtype=dtype),
            self.Vh.to(device=device, dtype=dtype),
        )

    def energy_share(self) -> torch.Tensor:
        """Cumulative energy share (float64, length r); energy = sum of singular values (Eq. 5)."""
        return energy_share(self.S)

    def rank_for(self, tau: float) -> int:
        """Smallest k whose top-k singular values hold at least the share tau in (0, 1) of the energy."""
        return rank_for_energy(self.S, tau)

    def groups(self, n: int = 10) -> list[torch.Tensor]:
        """Partition 0..r-1 into ``n`` energy groups (0-10 %, ..., 90-100 % for n = 10), as in Section 2.2.2.

        Singular value i belongs to group g = floor(n * E_before(i) / E_total), where E_before(i) is the
        energy of the singular values strictly before it: a value belongs to the group in which its
        slice of the cumulative energy starts. The groups are consecutive index ranges and every index
        lies in exactly one group. A group is empty when a single singular value holds more than 1/n
        of the energy (its slice then spans the next group's range too).
        """
        if n < 1:
            raise SpectraError(f"The number of energy groups must be at least 1, got {n}.")
        S64 = _checked_singular_values(self.S)
        before = torch.cumsum(S64, 0) - S64
        # Multiply before dividing: n * E_before / E_total is exact for integer-like energies, so a
        # value starting exactly on a boundary (e.g. at 70 %) lands in the group that begins there.
        group_of = torch.floor(n * before / S64.sum()).long().clamp_(0, n - 1)
        return [torch.nonzero(group_of == g).flatten() for g in range(n)]

    def reconstruct(self, indices: Indices) -> torch.Tensor:
        """sum_{i in indices} sigma_i u_i v_i^T, an (m, n) matrix."""
        idx = _as_index_tensor(indices, self.rank).to(self.S.device)
        return (self.U[:, idx] * self.S[idx]) @ self.Vh[idx]

    def reconstruct_top_energy(self, fraction: float) -> torch.Tensor:
        """Reconstruction from the top-n % by energy: the smallest k reaching ``fraction`` in (0, 1] (Sec. 2.2.1)."""
        return self.reconstruct(range(_rank_for_share(self.S, float(fraction))))

    def top(self, k: int) -> "Spectrum":
        """The top-k singular triplets as a Spectrum of the rank-k truncation."""
        if not 1 <= k <= self.rank:
            raise SpectraError(f"k must lie in 1..{self.rank} for this spectrum, got {k}.")
        return Spectrum(self.U[:, :k], self.S[:k], self.Vh[:k])

    @property
    def fro_norm(self) -> float:
        """||W||_F = sqrt(sum sigma_i^2)."""
        return float(torch.linalg.vector_norm(self.S.double()))

    @property
    def spectral_norm(self) -> float:
        """||W||_2 = sigma_1."""
        return float(self.S[0])

    @property
    def condition_number(self) -> float:
        """sigma_1 / sigma_r over the r = min(m, n) singular values; inf for a rank-deficient matrix."""
        smallest = float(self.S[-1])
        return float("inf") if smallest == 0.0 else float(self.S[0]) / smallest

    @property
    def effective_rank(self) -> float:
        """Entropy effective rank exp(H(p)), p_i = sigma_i / sum sigma (Roy & Vetterli, EUSIPCO 2007)."""
        return effective_rank(self.S)


def effective_rank(S: torch.Tensor) -> float:
    """Roy & Vetterli (2007) effective rank of singular values S: exp of the entropy of S / sum(S)."""
    S64 = _checked_singular_values(S)
    p = S64 / S64.sum()
    # 0 log 0 = 0: zero singular values add nothing to the entropy.
    entropy = -torch.sum(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)))
    return float(torch.exp(entropy))
