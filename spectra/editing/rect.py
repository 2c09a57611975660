"""RECT: MEMIT whose per-layer update keeps only its largest relative changes (reference section 6)."""

from __future__ import annotations

from typing import ClassVar

import torch

from spectra.editing.hparams import RectHParams
from spectra.editing.memit import MemitEditor
from spectra.models.sites import Site
from spectra.spectral import Delta


def relative_change_mask(update: torch.Tensor, weight: torch.Tensor, keep_percent: float, eps: float) -> torch.Tensor:
    """Boolean mask of the top ``keep_percent`` % entries of |Delta| / (|W| + eps).

    RECT's published code divides by the signed W + eps; |W| + eps is what the relative change
    means and never flips a sign or divides by a tiny negative number.
    """
    ratio = (update.abs() / (weight.abs() + eps)).reshape(-1)
    keep = max(1, round(ratio.numel() * keep_percent / 100))
    if keep >= ratio.numel():
        return torch.ones_like(update, dtype=torch.bool)
    threshold = torch.kthvalue(ratio, ratio.numel() - keep + 1).values
    return (ratio >= threshold).reshape(update.shape)


class RectEditor(MemitEditor):
    """MEMIT + RECT, with the mask applied INSIDE the layer loop.

    The reference (MEMIT_rect) masks only when it finally applies the updates, so its later layers
    are solved as if earlier layers had received the full update (reference gotcha 13). Here the
    masked update is what gets written before the next layer's keys and residual are computed, so
    later layers absorb what the mask removed. The REVIVE filter runs after the mask (section 12.3):
    RECT defines the relative change on the unfiltered update, and REVIVE's guarantee must hold
    for what is written.
    """

    name: ClassVar[str] = "rect"
    hparams_class: ClassVar[type[RectHParams]] = RectHParams

    def _shape_update(self, site: Site, delta: Delta, weight: torch.Tensor) -> Delta:
        dense = delta.to_dense()
        mask = relative_change_mask(dense, weight, self.hparams.keep_percent, self.hparams.eps)
        return Delta.of(dense * mask)
