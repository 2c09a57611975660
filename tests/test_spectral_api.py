"""The top-level functional API users script against: names, signatures and behaviour."""

from __future__ import annotations

import inspect

import torch

import spectra


def test_functional_api_names_and_signatures() -> None:
    """spectra.svd / rank_for_energy / revive / ls / ss keep their documented signatures."""
    expected = {
        "svd": ["W", "dtype"],
        "rank_for_energy": ["S", "tau"],
        "revive": ["W", "dW", "tau"],
        "ls": ["W0", "Wt", "tau"],
        "ss": ["W0", "Wt", "k", "tau", "side"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(spectra, name)).parameters) == params
        assert name in spectra.__all__
    defaults = inspect.signature(spectra.ss).parameters
    assert defaults["k"].default is None and defaults["tau"].default == 0.10 and defaults["side"].default == "right"
    assert inspect.signature(spectra.ls).parameters["tau"].default == 0.10


def test_functional_api_round_trip() -> None:
    """svd gives U, S, Vh; revive protects the dominant subspace; LS and SS see an unchanged top."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 64, generator=g)
    s = spectra.svd(W)
    assert torch.allclose((s.U * s.S) @ s.Vh, W, atol=1e-5)
    k = spectra.rank_for_energy(s.S, 0.1)
    safe = spectra.revive(W, 0.1 * torch.randn(40, 64, generator=g), 0.1)
    assert safe.shape == W.shape
    assert spectra.ls(W, W + safe) > 0.9999
    top = spectra.ss(W, W + safe)
    assert top.shape == (k, 40)
    assert torch.allclose(torch.diagonal(top[:, :k]), torch.ones(k), atol=1e-4)
