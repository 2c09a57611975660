"""Which singular triplets of an original weight REVIVE protects: the paper's energy criterion and four others.

The paper protects the top-k triplets with k from a singular-value energy threshold (Eq. 5) and
calls that choice empirical (Appendix B). Every criterion here yields the same object, a set of
triplet indices of W0 and so orthonormal bases U_k, V_k, which ``ReviveProjector`` filters with
unchanged. They differ in how many triplets a threshold tau buys and in which ones are chosen:

========== ====================================================== =================================
criterion  k at threshold tau                                      which k triplets
========== ====================================================== =================================
energy     smallest k with sum_{i<=k} sigma_i >= tau sum sigma      the top k by sigma (the paper)
rank       smallest k with k >= tau r (a fixed share of the rank)   the top k by sigma
sigma2     smallest k with sum_{i<=k} sigma_i^2 >= tau sum sigma^2  the top k by sigma
activation energy's k                                             the k with the largest
                                                                   E[(v_i^T x)^2] = v_i^T C v_i
fisher     energy's k                                             the k with the largest
                                                                   mean_b (u_i^T G_b v_i)^2
========== ====================================================== =================================

At an equal dimension k, energy, rank and sigma2 protect the same triplets: they differ only in
how a threshold shares dimension out among sites. activation and fisher take energy's k at tau,
so ``--protect activation --tau 0.1`` is compared with the paper at the same dimension per site.
An explicit ``dim`` protects that many triplets at every site, whatever the criterion.

The scores are pure linear algebra on what the caller measured on the model: C = E[x x^T], the
second moment of the site's inputs (the MEMIT key statistics for mlp.down), and gradients G_b of a
general-task loss with respect to the weight, one per mini-batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from spectra.errors import SpectraError
from spectra.spectral.decompose import svd
from spectra.spectral.revive import ReviveProjector
from spectra.spectral.spectrum import Spectrum, _rank_for_share, check_tau, effective_rank, energy_share

K = TypeVar("K", bound=Hashable)

#: Every protection criterion, the paper's first.
CRITERIA: tuple[str, ...] = ("energy", "rank", "sigma2", "activation", "fisher")
#: Criteria that rank triplets by a score measured on the model rather than by sigma.
SCORED: tuple[str, ...] = ("activation", "fisher")


@dataclass(frozen=True)
class Protection:
    """A protection criterion and its budget: the threshold ``tau`` or an explicit dimension ``dim`` per site."""

    criterion: str = "energy"
    tau: float | None = None
    dim: int | None = None

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise SpectraError(f"Unknown protection criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}.")
        if (self.tau is None) == (self.dim is None):
            raise SpectraError("A protection budget is a threshold tau or an explicit dimension per site: give exactly "
                               "one of them.")
        if self.tau is not None:
            check_tau(self.tau)
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1):
            raise SpectraError(f"The protected dimension must be a whole number of at least 1, got {self.dim!r}.")

    @property
    def scored(self) -> bool:
        """Whether the criterion needs per-triplet scores measured on the model (activation, fisher)."""
        return self.criterion in SCORED

    def size(self, spectrum: Spectrum) -> int:
        """k: how many triplets of ``spectrum`` this budget protects."""
        r = spectrum.rank
        if self.dim is not None:
            if self.dim > r:
                raise SpectraError(f"Cannot protect {self.dim} directions of a {spectrum.shape[0]} x "
                                   f"{spectrum.shape[1]} matrix, which has {r}; give --protect-dim at most {r}.")
            return self.dim
        return _rank_for_share(share_weights(spectrum.S, self.criterion), float(self.tau))

    def indices(self, spectrum: Spectrum, scores: torch.Tensor | None = None) -> torch.Tensor:
        """The protected triplets' indices (ascending, CPU long tensor); ``scores`` (r,) are needed by scored criteria."""
        k = self.size(spectrum)
        if not self.scored:
            if scores is not None:
                raise SpectraError(f"The {self.criterion} criterion ranks triplets by sigma; it takes no scores.")
            return torch.arange(k)
        if scores is None:
            raise SpectraError(f"The {self.criterion} criterion ranks triplets by measured scores; none were given.")
        values = scores.detach().to(device="cpu", dtype=torch.float64)
        if values.shape != (spectrum.rank,) or not torch.isfinite(values).all() or (values < 0).any():
            raise SpectraError(f"{self.criterion} scores must be {spectrum.rank} finite non-negative numbers, one per "
                               f"singular triplet; got shape {tuple(values.shape)}.")
        # A stable sort breaks ties by sigma's order, so equal scores protect the larger singular values.
        order = torch.sort(values, descending=True, stable=True).indices
        return torch.sort(order[:k]).values

    def projector(self, spectrum: Spectrum, scores: torch.Tensor | None = None) -> ReviveProjector:
        """The REVIVE projector protecting this budget's triplets of ``spectrum``."""
        return ReviveProjector(spectrum, indices=self.indices(spectrum, scores))

    def label(self) -> str:
        """A short name for tables and legends: ``energy@0.1`` or ``fisher k=12``."""
        return f"{self.criterion}@{self.tau:g}" if self.dim is None else f"{self.criterion} k={self.dim}"


def share_weights(S: torch.Tensor, criterion: str) -> torch.Tensor:
    """The per-triplet weights whose cumulative share a threshold tau is applied to, for ``criterion``.

    energy: sigma (Eq. 5); sigma2: sigma^2; rank: 1 per triplet. activation and fisher spend the
    same dimension as energy.
    """
    if criterion == "sigma2":
        return S.double() ** 2
    if criterion == "rank":
        return torch.ones_like(S, dtype=torch.float64)
    return S


def activation_scores(spectrum: Spectrum, second_moment: torch.Tensor) -> torch.Tensor:
    """E[(v_i^T x)^2] = v_i^T C v_i for every right singular vector v_i, from C = E[x x^T] (n, n): float64, (r,)."""
    n = spectrum.shape[1]
    if second_moment.shape != (n, n):
        raise SpectraError(f"The input second moment must be ({n}, {n}) for a matrix with {n} inputs, got "
                           f"{tuple(second_moment.shape)}.")
    V = spectrum.V.double()
    C = second_moment.to(device=V.device, dtype=torch.float64)
    # v^T C v >= 0 for a second moment; the clamp removes round-off below zero on directions no input uses.
    return ((C @ V) * V).sum(dim=0).clamp_(min=0.0)


def gradient_coefficients(spectrum: Spectrum, gradient: torch.Tensor) -> torch.Tensor:
    """u_i^T G v_i for every triplet: the gradient's coefficient on each rank-one direction u_i v_i^T (float64, (r,))."""
    if tuple(gradient.shape) != spectrum.shape:
        raise SpectraError(f"A gradient of shape {tuple(gradient.shape)} does not belong to a {spectrum.shape} matrix.")
    U, Vh = spectrum.U.double(), spectrum.Vh.double()
    return ((U.T @ gradient.to(device=U.device, dtype=torch.float64)) * Vh).sum(dim=1)


def fisher_scores(spectra: Mapping[K, Spectrum], gradients: Iterable[Mapping[K, torch.Tensor]]) -> dict[K, torch.Tensor]:
    """mean over mini-batches b of (u_i^T G_b v_i)^2 per site: the empirical Fisher of the loss along each u_i v_i^T.

    ``gradients`` yields one mapping site -> G_b (the loss gradient with respect to that site's
    weight, (out, in)) per mini-batch; it is consumed once, so a generator keeps one batch in memory.
    """
    sums = {site: torch.zeros(spectrum.rank, dtype=torch.float64) for site, spectrum in spectra.items()}
    batches = 0
    for batch in gradients:
        missing = set(spectra) - set(batch)
        if missing:
            raise SpectraError(f"A mini-batch brought no gradient for {', '.join(map(str, sorted(missing, key=str)))}.")
        for site, spectrum in spectra.items():
            sums[site] += gradient_coefficients(spectrum, batch[site]).cpu() ** 2
        batches += 1
    if batches == 0:
        raise SpectraError("Fisher scores need at least one mini-batch of the general-task loss; none was given.")
    return {site: total / batches for site, total in sums.items()}


def matching_tau(spectra: Sequence[Spectrum], criterion: str, total: int) -> float:
    """The smallest threshold at which ``criterion`` protects at least ``total`` triplets over all ``spectra``.

    Compares rank and sigma2 with energy at an equal total protected dimension: they share it out
    among the sites differently. The protected sizes change only at the criterion's cumulative
    shares, so the answer is one of them.
    """
    if criterion in SCORED:
        raise SpectraError(f"{criterion} spends energy's dimension at every site; match energy's tau instead.")
    weights = [share_weights(s.S, criterion) for s in spectra]
    candidates = torch.unique(torch.cat([energy_share(w) for w in weights]))
    for tau in candidates[(candidates > 0) & (candidates < 1)].tolist():
        if sum(_rank_for_share(w, tau) for w in weights) >= total:
            return float(tau)
    raise SpectraError(f"No threshold below 1 makes {criterion} protect {total} triplets over these "
                       f"{len(spectra)} matrices; ask for fewer.")


def complement_usage(delta: torch.Tensor, projector: ReviveProjector | None, rtol: float = 1e-6,
                     floor: float = 0.0) -> dict[str, float]:
    """How much of the protected complement an accumulated update ``delta`` (m, n) fills.

    The update is projected onto the complement, (I - U_k U_k^T) delta (I - V_k V_k^T), in the
    projector's dtype (all of it without a projector: nothing protected). Its ``rank`` counts
    singular values above ``rtol`` times the largest and above ``floor`` (the rounding noise of the
    weights it was computed from); ``effective_rank`` is Roy & Vetterli's; ``complement_rank`` =
    min(m, n) - k is the largest rank an update confined to the complement can have, and
    ``remaining`` = complement_rank - rank the directions still free.
    """
    work = delta.double()
    k = 0 if projector is None else projector.k
    if projector is not None:
        work = projector(work)
    complement = min(work.shape) - k
    S = svd(work, dtype=torch.float64).S
    if float(S[0]) <= floor or float(S[0]) == 0.0:
        return {"rank": 0.0, "effective_rank": 0.0, "complement_rank": float(complement), "remaining": float(complement)}
    rank = int((S > max(rtol * float(S[0]), floor)).sum())
    return {"rank": float(rank), "effective_rank": effective_rank(S), "complement_rank": float(complement),
            "remaining": float(complement - rank)}
