"""RECT's mask: the kept count of the official MEMIT_rect (the 'end' schedule) and of 'per_layer'."""

from __future__ import annotations

import torch

from spectra.editing.rect import kept_entries, relative_change_mask


def test_reference_count_keeps_n_minus_int_point_six_n_plus_one() -> None:
    """MEMIT_rect's kthvalue threshold at int(0.6 N) keeps N - int(0.6 N) + 1 entries, the largest ratios."""
    gen = torch.Generator().manual_seed(5)
    update, weight = torch.randn(10, 20, generator=gen), torch.randn(10, 20, generator=gen)
    mask = relative_change_mask(update, weight, keep_percent=40, eps=1e-8, reference_count=True)
    assert int(mask.sum()) == 200 - 120 + 1 == kept_entries(200, 40, reference_count=True)
    ratio = update.abs() / weight.abs()
    assert float(ratio[mask].min()) >= float(ratio[~mask].max())
    assert kept_entries(200, 100, reference_count=True) == 200 and kept_entries(200, 40, reference_count=False) == 80

