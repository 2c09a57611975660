"""SpectrumCache: spectra on disk as safetensors, keyed by everything that changes their content."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from spectra.errors import SpectraError
from spectra.spectral.decompose import check_matrix, svd_many
from spectra.spectral.spectrum import Spectrum

K = TypeVar("K", bound=Hashable)

#: Bumped whenever the stored layout or the decomposition routine changes, so old entries miss.
CACHE_FORMAT = 1


def default_cache_root() -> Path:
    """``$SPECTRA_CACHE`` if set, else ``~/.cache/spectra`` (read at call time, never at import)."""
    env = os.environ.get("SPECTRA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spectra"


def weights_fingerprint(W: torch.Tensor) -> str:
    """sha256 of W's dtype, shape and raw bytes: any changed weight changes the fingerprint."""
    data = W.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    # Viewing as bytes works for every dtype, bfloat16 included (numpy has no bfloat16).
    h.update(data.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class SpectrumCache:
    """Spectra under ``<root>/spectra/``: one ``<digest>.safetensors`` (U, S, Vh) and one ``<digest>.json``
    manifest per entry.

    The digest hashes the caller's key fields (model id, revision, site string, ...), the compute
    dtype, the cache format and the fingerprint of the weights themselves, so an edited weight can
    never hit a stale entry even when the caller's fields are unchanged.
    """

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()
        self.dir = self.root / "spectra"

    def key(self, key_fields: Mapping[str, Any], W: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The full key of W's entry: the caller's fields plus dtype, shape, fingerprint and format."""
        fields = dict(key_fields)
        try:
            json.dumps(fields, sort_keys=True)
        except TypeError as err:
            raise SpectraError(
                f"Cache key fields must be JSON values (strings, numbers, booleans, lists); {err}. "
                "Pass the model id, revision and site as strings."
            ) from None
        return {
            "fields": fields,
            "compute_dtype": str(dtype),
            "shape": list(W.shape),
            "weights_sha256": weights_fingerprint(W),
            "format": CACHE_FORMAT,
        }

    def _paths(self, key: dict[str, Any]) -> tuple[Path, Path]:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.dir / f"{digest}.safetensors", self.dir / f"{digest}.json"

    def get(self, key: dict[str, Any]) -> Spectrum | None:
        """The stored spectrum for a full key, or None on a miss (or a manifest that does not match)."""
        tensors_path, manifest_path = self._paths(key)
        if not (tensors_path.exists() and manifest_path.exists()):
            return None
        if json.loads(manifest_path.read_text()).get("key") != key:
            return None
        t = load_file(tensors_path)
        return Spectrum(t["U"], t["S"], t["Vh"])

    def put(self, key: dict[str, Any], spectrum: Spectrum) -> None:
        """Store a spectrum; files are written under temporary names and renamed, so readers never see half."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors_path, manifest_path = self._paths(key)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in
                   (("U", spectrum.U), ("S", spectrum.S), ("Vh", spectrum.Vh))}
        tmp = tensors_path.with_name(f"{tensors_path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, tensors_path)
        tmp = manifest_path.with_name(f"{manifest_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "file": tensors_path.name}, indent=2, sort_keys=True))
        os.replace(tmp, manifest_path)

    def get_or_compute(
        self, key_fields: Mapping[str, Any], W: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> Spectrum:
        """W's spectrum from the cache, computing and storing it on a miss; returned on W's device."""
        return self.get_or_compute_many({0: key_fields}, {0: W}, dtype=dtype)[0]

    def get_or_compute_many(
        self,
        key_fields: Mapping[K, Mapping[str, Any]],
        mats: Mapping[K, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        memory_budget_bytes: int | None = None,
        progress: bool = False,
    ) -> dict[K, Spectrum]:
        """Spectra of many matrices; the misses are decomposed together by ``svd_many`` and stored."""
        if set(key_fields) != set(mats):
            raise SpectraError("key_fields and mats must have the same keys, one key-field dict per matrix.")
        for name, W in mats.items():
            check_matrix(W, name=f"the matrix '{name}'")
        keys = {name: self.key(key_fields[name], mats[name], dtype) for name in mats}
        found: dict[K, Spectrum] = {}
        for name, key in keys.items():
            hit = self.get(key)
            if hit is not None:
                found[name] = hit.to(mats[name].device)
        missing = {name: W for name, W in mats.items() if name not in found}
        computed = svd_many(missing, dtype=dtype, device=device, memory_budget_bytes=memory_budget_bytes,
                            progress=progress) if missing else {}
        for name, spectrum in computed.items():
            self.put(keys[name], spectrum)
        found.update(computed)
        return {name: found[name] for name in mats}
