"""MEMIT: the closed-form multi-layer update Delta = R K^T (lambda C + K K^T)^-1 (reference section 4)."""

from __future__ import annotations

from typing import ClassVar

import torch

from spectra.editing.base import LocateEditEditor, memit_solve
from spectra.editing.filters import SiteFilter
from spectra.editing.hparams import MemitHParams
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.spectral import Delta


class MemitEditor(LocateEditEditor):
    """Plain MEMIT applied round after round (weights never restored), as the sequential baselines run it.

    With REVIVE placed in the solve (the default), the update is MEMIT's optimum among updates with
    Delta V_k = 0, and the filter afterwards only removes its U_k part, which is optimal on that side
    (reference 12.2). Placed after, the right-side projection of the unconstrained optimum is not.
    """

    name: ClassVar[str] = "memit"
    hparams_class: ClassVar[type[MemitHParams]] = MemitHParams

    def _solve(self, model: LoadedModel, site: Site, keys: torch.Tensor, residual: torch.Tensor, filter: SiteFilter) -> Delta:
        covariance = self.covariance(model, site.layer)
        return memit_solve(
            keys, residual, covariance, self.hparams.mom2_update_weight, ridge=self.hparams.ridge,
            protected_inputs=self._protected_inputs(site, filter),
        )
