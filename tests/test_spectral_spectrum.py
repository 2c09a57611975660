"""Spectrum: energy shares, dominant rank, energy groups, reconstruction and scalar summaries."""

from __future__ import annotations

import math

import pytest
import torch

from spectra.errors import SpectraError
from spectra.spectral import Spectrum, matrix_with_singular_values, rank_for_energy, svd


def diagonal_spectrum(values: list[float]) -> Spectrum:
    """Spectrum of diag(values) padded to r x (r + 2), built by hand (independent of any SVD routine)."""
    r = len(values)
    f64 = torch.float64
    return Spectrum(torch.eye(r, dtype=f64), torch.tensor(values, dtype=f64), torch.eye(r, r + 2, dtype=f64))


def test_svd_of_a_known_diagonal_matrix() -> None:
    """The SVD of diag(1, 4, 2, 3) (as 4 x 6) gives sorted values and signed unit vectors."""
    W = torch.zeros(4, 6, dtype=torch.float64)
    W[0, 0], W[1, 1], W[2, 2], W[3, 3] = 1.0, 4.0, 2.0, 3.0
    s = svd(W, dtype=torch.float64)
    assert s.S.tolist() == pytest.approx([4.0, 3.0, 2.0, 1.0])
    assert s.shape == (4, 6) and s.rank == 4
    for i, row in enumerate([1, 3, 2, 0]):
        assert abs(float(s.U[row, i])) == pytest.approx(1.0)
        assert abs(float(s.Vh[i, row])) == pytest.approx(1.0)
    assert s.spectral_norm == pytest.approx(4.0)
    assert s.condition_number == pytest.approx(4.0)
    assert s.fro_norm == pytest.approx(math.sqrt(30.0))
    assert torch.allclose(s.reconstruct(range(4)), W, atol=1e-12)


def test_energy_share_uses_singular_values_not_squares() -> None:
    """Energy is sum(sigma) (paper Eq. 5): shares of (4, 3, 2, 1) are .4, .7, .9, 1."""
    s = diagonal_spectrum([4.0, 3.0, 2.0, 1.0])
    assert s.energy_share().tolist() == pytest.approx([0.4, 0.7, 0.9, 1.0])


@pytest.mark.parametrize(
    ("tau", "k"), [(0.1, 1), (0.4, 1), (0.41, 2), (0.7, 2), (0.71, 3), (0.9, 3), (0.95, 4), (0.999, 4)]
)
def test_rank_for_energy_is_the_smallest_k_reaching_tau(tau: float, k: int) -> None:
    """k is the smallest rank with cumulative share >= tau, ties included."""
    assert rank_for_energy(torch.tensor([4.0, 3.0, 2.0, 1.0]), tau) == k


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_rank_for_energy_rejects_tau_outside_open_unit_interval(tau: float) -> None:
    """tau must lie strictly inside (0, 1)."""
    with pytest.raises(SpectraError, match="strictly between 0 and 1"):
        rank_for_energy(torch.tensor([2.0, 1.0]), tau)


def test_zero_matrix_has_no_energy() -> None:
    """A zero matrix is reported, not divided by zero."""
    with pytest.raises(SpectraError, match="zero"):
        rank_for_energy(torch.zeros(3), 0.5)


def test_groups_assign_each_value_by_the_energy_before_it() -> None:
    """(4, 3, 2, 1) starts at 0 %, 40 %, 70 %, 90 %: groups 0, 4, 7, 9; the rest are empty."""
    groups = diagonal_spectrum([4.0, 3.0, 2.0, 1.0]).groups(10)
    assert [g.tolist() for g in groups] == [[0], [], [], [], [1], [], [], [2], [], [3]]


@pytest.mark.parametrize("n", [1, 3, 10])
def test_groups_partition_the_indices_into_consecutive_runs(n: int) -> None:
    """Every index lies in exactly one group; groups are ordered, consecutive and energy-bounded."""
    g = torch.Generator().manual_seed(0)
    s = svd(torch.randn(120, 200, generator=g))
    groups = s.groups(n)
    assert len(groups) == n
    assert torch.equal(torch.cat(groups), torch.arange(s.rank))
    before = s.energy_share() - s.S.double() / s.S.double().sum()
    for i, group in enumerate(groups):
        assert ((before[group] >= i / n - 1e-12) & (before[group] < (i + 1) / n + 1e-12)).all()


def test_reconstruction_from_all_groups_returns_w() -> None:
    """Summing the reconstructions of the ten groups gives W back."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(90, 150, generator=g)
    s = svd(W)
    total = sum(s.reconstruct(group) for group in s.groups(10))
    assert torch.linalg.matrix_norm(total - W) <= 1e-5 * torch.linalg.matrix_norm(W)


def test_reconstruct_top_energy_keeps_the_smallest_k_reaching_the_fraction() -> None:
    """Top-n % keeps exactly rank_for(n) components; 1.0 keeps all; fraction 0 is refused."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(60, 80, generator=g, dtype=torch.float64)
    s = svd(W, dtype=torch.float64)
    k = s.rank_for(0.3)
    assert torch.allclose(s.reconstruct_top_energy(0.3), s.reconstruct(range(k)))
    assert torch.linalg.matrix_rank(s.reconstruct_top_energy(0.3)) == k
    assert torch.allclose(s.reconstruct_top_energy(1.0), W, atol=1e-10)
    with pytest.raises(SpectraError):
        s.reconstruct_top_energy(0.0)


def test_reconstruct_rejects_out_of_range_indices() -> None:
    """Indices beyond r are a user error."""
    with pytest.raises(SpectraError, match="0..3"):
        diagonal_spectrum([4.0, 3.0, 2.0, 1.0]).reconstruct([0, 4])


def test_effective_rank_is_roy_vetterli() -> None:
    """Equal singular values give r; one nonzero value gives 1; else exp(entropy) by hand."""
    assert diagonal_spectrum([2.0] * 4).effective_rank == pytest.approx(4.0)
    assert diagonal_spectrum([5.0, 0.0, 0.0, 0.0]).effective_rank == pytest.approx(1.0)
    p = torch.tensor([4.0, 3.0, 2.0, 1.0]) / 10
    assert diagonal_spectrum([4.0, 3.0, 2.0, 1.0]).effective_rank == pytest.approx(
        math.exp(-float((p * p.log()).sum())), rel=1e-6
    )


def test_condition_number_of_rank_deficient_matrix_is_infinite() -> None:
    """sigma_r = 0 gives an infinite condition number."""
    assert diagonal_spectrum([1.0, 0.5, 0.0, 0.0]).condition_number == float("inf")


def test_inconsistent_factors_are_refused() -> None:
    """U, S, Vh must agree on r."""
    with pytest.raises(SpectraError, match="Inconsistent"):
        Spectrum(torch.eye(4, 3), torch.ones(2), torch.eye(3, 5))


def test_top_k_spectrum_reconstructs_the_truncation() -> None:
    """Spectrum.top(k) is the rank-k truncation."""
    g = torch.Generator().manual_seed(3)
    W = matrix_with_singular_values(30, 40, torch.linspace(3, 1, 30), g, dtype=torch.float64)
    s = svd(W, dtype=torch.float64)
    top = s.top(5)
    assert torch.allclose(top.reconstruct(range(5)), s.reconstruct(range(5)))
    with pytest.raises(SpectraError):
        s.top(31)
