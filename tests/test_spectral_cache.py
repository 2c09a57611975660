"""SpectrumCache: hits for the same weights and key, misses for any change, files and manifest on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import spectra.spectral.cache as cache_module
from spectra.errors import SpectraError
from spectra.spectral import Spectrum, SpectrumCache, svd_many

FIELDS = {"model": "tiny", "revision": "abc123", "site": "mlp.down@1"}


def counting_svd(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the cache's svd_many by a counting wrapper; returns the list of batch sizes it saw."""
    calls: list[int] = []

    def wrapped(mats: dict[object, torch.Tensor], **kwargs: object) -> dict[object, Spectrum]:
        calls.append(len(mats))
        return svd_many(mats, **kwargs)

    monkeypatch.setattr(cache_module, "svd_many", wrapped)
    return calls


def test_same_weight_hits_and_changed_weight_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second request for the same weights is served from disk; one changed entry recomputes."""
    calls = counting_svd(monkeypatch)
    cache = SpectrumCache(tmp_path)
    W = torch.randn(30, 50, generator=torch.Generator().manual_seed(0))
    first = cache.get_or_compute(FIELDS, W)
    second = cache.get_or_compute(FIELDS, W.clone())
    assert calls == [1]
    assert torch.equal(first.U, second.U) and torch.equal(first.S, second.S) and torch.equal(first.Vh, second.Vh)

    edited = W.clone()
    edited[3, 7] += 1e-3
    third = cache.get_or_compute(FIELDS, edited)
    assert calls == [1, 1]
    assert not torch.equal(third.S, first.S)


def test_key_fields_and_dtype_are_part_of_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another revision, site or compute dtype is another entry, even for identical weights."""
    calls = counting_svd(monkeypatch)
    cache = SpectrumCache(tmp_path)
    W = torch.randn(20, 10, generator=torch.Generator().manual_seed(1))
    cache.get_or_compute(FIELDS, W)
    cache.get_or_compute({**FIELDS, "revision": "def456"}, W)
    cache.get_or_compute({**FIELDS, "site": "mlp.down@2"}, W)
    s64 = cache.get_or_compute(FIELDS, W, dtype=torch.float64)
    assert calls == [1, 1, 1, 1]
    assert s64.S.dtype == torch.float64


def test_files_and_manifest_under_root_spectra(tmp_path: Path) -> None:
    """Entries are a safetensors file plus a JSON manifest holding the full key, under <root>/spectra/."""
    cache = SpectrumCache(tmp_path)
    W = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    cache.get_or_compute(FIELDS, W)
    tensors = list((tmp_path / "spectra").glob("*.safetensors"))
    manifests = list((tmp_path / "spectra").glob("*.json"))
    assert len(tensors) == 1 and len(manifests) == 1
    key = json.loads(manifests[0].read_text())["key"]
    assert key["fields"] == FIELDS
    assert key["compute_dtype"] == "torch.float32"
    assert key["shape"] == [8, 6]
    assert len(key["weights_sha256"]) == 64
    assert not list((tmp_path / "spectra").glob("*.tmp"))


def test_root_defaults_to_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPECTRA_CACHE overrides ~/.cache/spectra, read when the cache is made."""
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "elsewhere"))
    assert SpectrumCache().dir == tmp_path / "elsewhere" / "spectra"
    monkeypatch.delenv("SPECTRA_CACHE")
    assert SpectrumCache().root == Path.home() / ".cache" / "spectra"


def test_many_decomposes_only_the_misses_in_one_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """get_or_compute_many serves hits from disk and sends all misses to one svd_many call."""
    calls = counting_svd(monkeypatch)
    cache = SpectrumCache(tmp_path)
    g = torch.Generator().manual_seed(3)
    mats = {layer: torch.randn(12, 16, generator=g) for layer in range(4)}
    fields = {layer: {**FIELDS, "site": f"mlp.down@{layer}"} for layer in mats}
    cache.get_or_compute(fields[0], mats[0])
    out = cache.get_or_compute_many(fields, mats)
    assert calls == [1, 3]
    assert list(out) == [0, 1, 2, 3]
    for layer, W in mats.items():
        s = out[layer]
        assert torch.allclose((s.U * s.S) @ s.Vh, W, atol=1e-5)


def test_bfloat16_weights_are_fingerprinted_and_cached(tmp_path: Path) -> None:
    """Half-precision weights (no numpy dtype) are fingerprinted from their raw bytes."""
    cache = SpectrumCache(tmp_path)
    W = torch.randn(10, 12, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    assert cache.key(FIELDS, W) == cache.key(FIELDS, W.clone())
    assert cache.get_or_compute(FIELDS, W).S.dtype == torch.float32


def test_non_json_key_fields_are_refused(tmp_path: Path) -> None:
    """Key fields must be JSON values so that the manifest can record them."""
    with pytest.raises(SpectraError, match="JSON"):
        SpectrumCache(tmp_path).get_or_compute({"model": object()}, torch.eye(3))
