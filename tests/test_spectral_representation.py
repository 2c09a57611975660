"""Relative change rate R_k and representation geometry (parameter-editing-limits paper)."""

from __future__ import annotations

import math

import pytest
import torch

from spectra.errors import SpectraError
from spectra.spectral import random_orthonormal, relative_change_rate, representation_geometry


def representations(n: int, d: int, sigmas: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H (n, d) whose centred version has exactly the singular values ``sigmas``, and its right vectors."""
    g = torch.Generator().manual_seed(seed)
    r = sigmas.numel()
    left = torch.randn(n, r, generator=g, dtype=torch.float64)
    left = torch.linalg.qr(left - left.mean(0))[0]  # orthonormal columns, each with zero mean
    right = random_orthonormal(d, r, g)
    mean = torch.randn(1, d, generator=g, dtype=torch.float64) * 5
    return mean + (left * sigmas) @ right.T, right


def test_rate_matches_the_definition_computed_independently() -> None:
    """R_k = RMS_p(c_pk) / (sigma_k / sqrt n), with u_k, sigma_k from the covariance eigendecomposition."""
    g = torch.Generator().manual_seed(0)
    H0 = torch.randn(200, 30, generator=g, dtype=torch.float64) * torch.linspace(5, 0.5, 30, dtype=torch.float64)
    H1 = H0 + 0.1 * torch.randn(200, 30, generator=g, dtype=torch.float64)
    centred = H0 - H0.mean(0)
    lam, vecs = torch.linalg.eigh(centred.T @ centred)
    lam, vecs = lam.flip(0), vecs.flip(1)
    c = (H1 - H0) @ vecs
    expected = torch.sqrt((c**2).mean(0)) / (torch.sqrt(lam) / math.sqrt(200))
    assert torch.allclose(relative_change_rate(H0, H1), expected, rtol=1e-8)


def test_a_shift_along_one_direction_is_measured_against_its_own_scale() -> None:
    """Shifting every prompt by delta along u_j gives R_j = delta sqrt(n) / sigma_j and R_k = 0 elsewhere;
    the same shift along a weaker direction is amplified by the ratio of scales."""
    sigmas = torch.tensor([8.0, 4.0, 1.0, 0.01], dtype=torch.float64)
    H0, directions = representations(50, 12, sigmas, seed=1)
    delta = 0.02
    for j in (0, 3):
        H1 = H0 + delta * directions[:, j]
        rates = relative_change_rate(H0, H1)
        assert rates.shape == (4,)
        assert float(rates[j]) == pytest.approx(delta * math.sqrt(50) / float(sigmas[j]), rel=1e-8)
        others = torch.cat([rates[:j], rates[j + 1 :]])
        assert others.abs().max() <= 1e-8
    assert relative_change_rate(H0, H0).abs().max() == 0


def test_directions_beyond_the_numerical_rank_are_dropped() -> None:
    """n prompts in d > n dimensions: the centred data has rank n - 1 and so many rates."""
    g = torch.Generator().manual_seed(2)
    H0 = torch.randn(10, 40, generator=g)
    rates = relative_change_rate(H0, H0 + 0.01 * torch.randn(10, 40, generator=g))
    assert rates.shape == (9,) and rates.dtype == torch.float64 and torch.isfinite(rates).all()


def test_geometry_of_known_representations() -> None:
    """Centred singular values (8, 4, 1, 0.01): sigma range, condition number, effective rank, rank."""
    sigmas = torch.tensor([8.0, 4.0, 1.0, 0.01], dtype=torch.float64)
    H, _ = representations(50, 12, sigmas, seed=3)
    geo = representation_geometry(H)
    p = sigmas / sigmas.sum()
    assert geo["n"] == 50 and geo["d"] == 12 and geo["numerical_rank"] == 4
    assert geo["sigma_max"] == pytest.approx(8.0, rel=1e-10)
    assert geo["sigma_min"] == pytest.approx(0.01, rel=1e-8)
    assert geo["condition_number"] == pytest.approx(800.0, rel=1e-8)
    assert geo["effective_rank"] == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-8)
    assert geo["effective_rank_frac"] == pytest.approx(geo["effective_rank"] / 12)


def test_bad_representations_are_refused() -> None:
    """Mismatched shapes, a single prompt and identical rows raise SpectraError."""
    with pytest.raises(SpectraError, match="same shape"):
        relative_change_rate(torch.randn(5, 4), torch.randn(6, 4))
    with pytest.raises(SpectraError, match="at least 2"):
        representation_geometry(torch.randn(1, 4))
    with pytest.raises(SpectraError, match="identical"):
        representation_geometry(torch.ones(5, 4))
