"""Site filters applied to every update between an editor's solve and its write: Identity and REVIVE."""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch

from spectra.errors import SpectraError
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.spectral import Delta, Protection, ReviveProjector, svd


@runtime_checkable
class SiteFilter(Protocol):
    """``filter(site, delta) -> delta``; editors call it per layer after the solve, before the write.

    A filter may also define ``begin_round(model)``; editors call it (when present) at the start of
    every round, before any write, so a filter can rebuild what depends on the current weights.
    """

    def __call__(self, site: Site, delta: Delta) -> Delta: ...


class IdentityFilter:
    """REVIVE off: every update is written as solved."""

    def begin_round(self, model: LoadedModel) -> None:
        """Nothing to rebuild."""

    def __call__(self, site: Site, delta: Delta) -> Delta:
        return delta


class ReviveFilter:
    """REVIVE on: project each update out of the protected singular subspaces of its site's weight.

    ``bases`` holds one ``ReviveProjector`` per site, built from the ORIGINAL weights (paper text).
    ``protection`` says how they were chosen (default: the paper's energy criterion at ``tau``).
    With ``refresh="current"`` the projectors are rebuilt from the weights as they are at the start
    of every round (the paper's Algorithm 1 wording; see reference section 13), which costs one SVD
    per site per round; criteria scored on the model (activation, fisher) cannot be rebuilt so.
    """

    def __init__(self, bases: dict[Site, ReviveProjector], tau: float, refresh: str = "original",
                 protection: Protection | None = None) -> None:
        if refresh not in ("original", "current"):
            raise SpectraError(f"REVIVE refresh must be 'original' or 'current', not {refresh!r}.")
        if not bases:
            raise SpectraError("A REVIVE filter needs at least one site to protect.")
        self.protection = protection if protection is not None else Protection("energy", tau=tau)
        if refresh == "current" and self.protection.scored:
            raise SpectraError(
                f"The {self.protection.criterion} criterion ranks directions by scores measured on the original model, "
                "so its protected set cannot be rebuilt from the current weights each round: use --refresh original, or "
                "the energy, rank or sigma2 criterion."
            )
        self.bases = dict(bases)
        self.tau = float(tau)
        self.refresh = refresh

    @classmethod
    def from_model(
        cls, model: LoadedModel, sites: Iterable[Site], tau: float, refresh: str = "original",
        dtype: torch.dtype = torch.float32,
    ) -> "ReviveFilter":
        """Build projectors from the model's current (call it before editing: original) weights."""
        return cls(_projectors(model, list(sites), Protection("energy", tau=tau), dtype), tau, refresh)

    def begin_round(self, model: LoadedModel) -> None:
        """With ``refresh="current"``, rebuild every site's basis from the model's current weights."""
        if self.refresh == "current":
            dtype = next(iter(self.bases.values())).Uk.dtype
            self.bases = _projectors(model, list(self.bases), self.protection, dtype)

    def basis(self, site: Site) -> ReviveProjector:
        """The projector protecting ``site`` (its U_k, V_k and k)."""
        if site not in self.bases:
            known = ", ".join(str(s) for s in sorted(self.bases))
            raise SpectraError(f"The REVIVE filter has no basis for {site}; it protects {known}.")
        return self.bases[site]

    def __call__(self, site: Site, delta: Delta) -> Delta:
        return self.basis(site)(delta)


def _projectors(model: LoadedModel, sites: list[Site], protection: Protection,
                dtype: torch.dtype) -> dict[Site, ReviveProjector]:
    # Upcast before the SVD: half-precision weights would lose the small singular values.
    return {site: protection.projector(svd(model.adapter.read(site).to(dtype), dtype=dtype)) for site in sites}


def begin_round(filter: SiteFilter, model: LoadedModel) -> None:
    """Call ``filter.begin_round(model)`` if the filter has one (plain callables are filters too)."""
    hook = getattr(filter, "begin_round", None)
    if callable(hook):
        hook(model)
