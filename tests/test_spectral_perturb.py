"""Group perturbations (paper Eq. 2, App. F.1): exact norm, confined to the group, reproducible."""

from __future__ import annotations

import pytest
import torch

from spectra.errors import SpectraError
from spectra.spectral import Spectrum, group_perturbation, svd


@pytest.fixture(scope="module")
def spectrum() -> Spectrum:
    return svd(torch.randn(80, 120, generator=torch.Generator().manual_seed(0)), dtype=torch.float64)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("group_number", [0, 4, 9])
def test_perturbation_has_norm_eps_and_lies_in_the_group(spectrum: Spectrum, side: str, group_number: int) -> None:
    """||Delta||_F = eps; U^T Delta V vanishes outside the group's columns (input) or rows (output)."""
    group = spectrum.groups(10)[group_number]
    eps = 0.37
    delta = group_perturbation(spectrum, group, side, eps, torch.Generator().manual_seed(1))
    assert float(torch.linalg.matrix_norm(delta)) == pytest.approx(eps, rel=1e-12)
    # Coefficients in the full singular basis of W (U and V complete here: r = m on the left, and
    # the n - r missing right vectors are orthogonal to every v_j, so Delta must not touch them).
    alpha = spectrum.U.T @ delta @ spectrum.V
    outside = torch.ones(spectrum.rank, dtype=torch.bool)
    outside[group] = False
    leaked = alpha[:, outside] if side == "input" else alpha[outside, :]
    assert leaked.abs().max() <= 1e-12
    residual = delta - spectrum.U @ alpha @ spectrum.Vh  # nothing outside span{u_i v_j^T}
    assert torch.linalg.matrix_norm(residual) <= 1e-12
    inside = alpha[:, group] if side == "input" else alpha[group, :]
    assert (inside != 0).float().mean() > 0.99  # a dense random remap, not a sparse one


def test_same_seed_same_perturbation_other_seed_other(spectrum: Spectrum) -> None:
    """The generator alone decides the draw."""
    group = spectrum.groups(10)[2]
    a = group_perturbation(spectrum, group, "input", 1.0, torch.Generator().manual_seed(7))
    b = group_perturbation(spectrum, group, "input", 1.0, torch.Generator().manual_seed(7))
    c = group_perturbation(spectrum, group, "input", 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_input_and_output_sides_are_transposes_of_each_other_for_a_square_identity() -> None:
    """For W = I the input-side Delta is A[:, G] and the output-side one B[G, :]: columns vs rows."""
    s = svd(torch.eye(6, dtype=torch.float64), dtype=torch.float64)
    d_in = group_perturbation(s, [1, 2], "input", 1.0, torch.Generator().manual_seed(0))
    d_out = group_perturbation(s, [1, 2], "output", 1.0, torch.Generator().manual_seed(0))
    cols = d_in.abs().sum(0) > 1e-12
    rows = d_out.abs().sum(1) > 1e-12
    assert int(cols.sum()) == 2 and int(rows.sum()) == 2


@pytest.mark.parametrize(
    ("group", "side", "eps", "match"),
    [
        ([], "input", 1.0, "empty"),
        ([0], "sideways", 1.0, "side"),
        ([0], "input", -1.0, "eps"),
        ([999], "input", 1.0, "indices"),
    ],
)
def test_bad_arguments_are_refused(spectrum: Spectrum, group: list[int], side: str, eps: float, match: str) -> None:
    """Empty groups, unknown sides, negative strengths and out-of-range indices raise SpectraError."""
    with pytest.raises(SpectraError, match=match):
        group_perturbation(spectrum, group, side, eps, torch.Generator().manual_seed(0))
