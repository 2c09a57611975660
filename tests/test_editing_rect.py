"""RECT's mask schedules: the official kept count, and REVIVE's key side inside the solve under the 'end' schedule."""

from __future__ import annotations

import torch
from test_editing_editors import build
from test_editing_support import requests, tiny_model
from test_editing_support import single_thread  # noqa: F401 - autouse fixture, applied to this module

from spectra.editing import ReviveFilter
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


def test_end_schedule_solves_with_revive_inside_and_keeps_its_guarantee(tmp_path) -> None:
    """The 'end' loop runs with the identity filter, yet the round's REVIVE filter still shapes every solve.

    In the solve and after it give different updates (the constrained solve is another optimum);
    both leak nothing into the protected subspaces.
    """
    written = {}
    for placement in ("in_solve", "after"):
        model = tiny_model("llama")
        reqs = requests(model, 3)
        editor = build("rect", model, tmp_path, revive_placement=placement, mask_schedule="end")
        editor.prepare(model, reqs)
        revive = ReviveFilter.from_model(model, editor.edited_sites(model), tau=0.5)
        written[placement] = editor.apply_round(model, reqs, revive)
        for site, delta in written[placement].items():
            leak = revive.basis(site).leakage(delta)
            assert leak["left"] < 1e-5 and leak["right"] < 1e-5
    first = min(written["after"])
    assert not torch.allclose(written["in_solve"][first].to_dense(), written["after"][first].to_dense(), atol=1e-4)
