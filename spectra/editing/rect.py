"""RECT: MEMIT whose per-layer update keeps only its largest relative changes (reference section 6)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from spectra.editing.base import down_site
from spectra.editing.core import PromptRows
from spectra.editing.filters import IdentityFilter, SiteFilter
from spectra.editing.hparams import RectHParams
from spectra.editing.memit import MemitEditor
from spectra.editing.stats import Corpus
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.spectral import Delta


def kept_entries(numel: int, keep_percent: float, reference_count: bool) -> int:
    """How many of ``numel`` entries the mask keeps.

    The official MEMIT_rect thresholds at the k-th smallest ratio, k = int(N (100 - p) / 100), and
    keeps every ratio at or above it: N - k + 1 entries (one more than p % when p % of N is whole).
    Without ``reference_count`` it is round(N p / 100).
    """
    if reference_count:
        drop = int(numel * (100 - keep_percent) / 100)
        keep = numel if drop == 0 else numel - drop + 1
    else:
        keep = round(numel * keep_percent / 100)
    return min(numel, max(1, keep))


def relative_change_mask(
    update: torch.Tensor, weight: torch.Tensor, keep_percent: float, eps: float, *, reference_count: bool = False
) -> torch.Tensor:
    """Boolean mask of the entries of ``update`` with the largest |Delta| / (|W| + eps) (``kept_entries`` of them).

    RECT's published code divides by the signed W + eps; |W| + eps is what the relative change
    means and never flips a sign or divides by a tiny negative number (the two differ only where
    |W| < eps).
    """
    ratio = (update.abs() / (weight.abs() + eps)).reshape(-1)
    keep = kept_entries(ratio.numel(), keep_percent, reference_count)
    if keep >= ratio.numel():
        return torch.ones_like(update, dtype=torch.bool)
    threshold = torch.kthvalue(ratio, ratio.numel() - keep + 1).values
    return (ratio >= threshold).reshape(update.shape)


class RectEditor(MemitEditor):
    """MEMIT + RECT, with the mask applied once after all layers (``end``) or before each write (``per_layer``).

    ``end`` is the official MEMIT_rect: every layer is solved and written unmasked, as MEMIT does,
    so later layers are solved as if earlier layers kept their full update; then the weights go
    back to the round's start, each update is masked against them and written. ``per_layer`` writes
    the masked update before the next layer's keys and residual are computed, so later layers
    absorb what the mask removed. In both the REVIVE filter runs after the mask (section 12.3):
    RECT defines the relative change on the unfiltered update, and REVIVE's guarantee must hold for
    what is written; with REVIVE in the solve, every layer's solve is the constrained one.
    """

    name: ClassVar[str] = "rect"
    hparams_class: ClassVar[type[RectHParams]] = RectHParams

    def __init__(self, hparams: RectHParams, corpus: Corpus | None = None, **kwargs: Any) -> None:
        super().__init__(hparams, corpus, **kwargs)
        self._round_filter: SiteFilter | None = None

    def _spread(self, model: LoadedModel, rows: PromptRows, z: torch.Tensor, filter: SiteFilter) -> dict[Site, Delta]:
        """``per_layer``: the shared loop. ``end``: the loop unmasked and unfiltered, then mask, filter, write."""
        if self.hparams.mask_schedule == "per_layer":
            return super()._spread(model, rows, z, filter)
        start = {site: self._weights.get(model, site) for site in map(down_site, self.hparams.layers)}
        self._round_filter = filter
        try:
            solved = super()._spread(model, rows, z, IdentityFilter())
        finally:
            self._round_filter = None
        written: dict[Site, Delta] = {}
        for site, delta in solved.items():
            dense = delta.to_dense()
            mask = relative_change_mask(dense, start[site], self.hparams.keep_percent, self.hparams.eps, reference_count=True)
            written[site] = filter(site, Delta.of(dense * mask))
            self._weights.set(model, site, start[site] + written[site].to_dense().to(start[site]))
        return written

    def _protected_inputs(self, site: Site, filter: SiteFilter) -> torch.Tensor | None:
        """The round's own filter decides, also while ``end`` runs the loop with the identity filter."""
        return super()._protected_inputs(site, self._round_filter if self._round_filter is not None else filter)

    def _shape_update(self, site: Site, delta: Delta, weight: torch.Tensor) -> Delta:
        """``per_layer``: mask before the write; ``end``: unchanged (the mask comes after the loop)."""
        if self.hparams.mask_schedule == "end":
            return delta
        dense = delta.to_dense()
        return Delta.of(dense * relative_change_mask(dense, weight, self.hparams.keep_percent, self.hparams.eps))
