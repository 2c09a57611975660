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
    """Plain MEMIT applied round after round (weights never restored), as the sequential baselines run it."""

    name: ClassVar[str] = "memit"
    hparams_class: ClassVar[type[MemitHParams]] = MemitHParams

    def _solve(self, model: LoadedModel, site: Site, keys: torch.Tensor, residual: torch.Tensor, filter: SiteFilter) -> Delta:
        covariance = self.covariance(model, site.layer)
        return memit_solve(keys, residual, covariance, self.hparams.mom2_update_weight, ridge=self.hparams.ridge)
