"""Precomputed key statistics: the MEMIT/ROME ``layer_stats`` .npz files and spectra's own cache entries.

The official code (kmeng01/rome and memit ``layer_stats.py``, copied by AlphaEdit and EasyEdit)
saves one file per layer, ``<stats_dir>/<model>/<dataset>_stats/<module>_<precision>_mom2_<n>.npz``
(e.g. ``model.layers.4.mlp.down_proj_float32_mom2_100000.npz``), holding ``mom2.mom2`` (the SUM
S of k k^T over the corpus tokens), ``mom2.count`` (the token count N), ``mom2.constructor`` and
``sample_size`` (documents). C = S / N. spectra's cache holds C itself in
``layer<L>-<digest>.safetensors`` next to a JSON manifest with the layer and token count.

Files are located and their headers read before the model loads; each matrix is checked
against its layer's shape when it is used. ``.npz`` files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from spectra.errors import SpectraError
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site

#: ``<module>_<precision>_<stats>[_t<batch_tokens>][_<sample_size>].npz`` (``_t{batch_tokens}`` is written
#: literally by the official code: its f-string is missing its ``f``).
NPZ_NAME = re.compile(
    r"^(?P<module>.+?)_(?P<precision>float16|float32|float64|bfloat16)_(?P<stats>[a-z0-9-]*mom2[a-z0-9-]*)"
    r"(?:_t(?:\{batch_tokens\}|\d+))?(?:_(?P<n>\d+))?\.npz$"
)

#: The npz members a second moment needs (``CombinedStat(mom2=SecondMoment())``'s state dict).
NPZ_MOMENT, NPZ_COUNT = "mom2.mom2", "mom2.count"

LAYOUT = ("the MEMIT/ROME layout <module>_float32_mom2_<n>.npz (e.g. model.layers.4.mlp.down_proj_float32_mom2_"
          "100000.npz) with mom2.mom2 and mom2.count, or spectra's own cache files (layer<L>-<digest>.safetensors "
          "with their .json manifest)")


@dataclass(frozen=True)
class StatsFile:
    """One layer's precomputed second moment: where it is, in which layout, and how many tokens it averages."""

    layer: int
    path: Path
    layout: str
    count: int
    sample_size: int | None = None
    module: str | None = None

    def provenance(self) -> dict[str, Any]:
        """What config.json records about this file."""
        return {"file": str(self.path), "layout": self.layout, "tokens": self.count, "documents": self.sample_size,
                "module": self.module}

    def moment(self) -> torch.Tensor:
        """The mean C = E[k k^T] (float32), read from the file."""
        if self.layout == "spectra":
            from safetensors.torch import load_file

            return load_file(str(self.path))["mom2"].float()
        with _npz(self.path) as data:
            total = _member(data, NPZ_MOMENT, self.path)
        return torch.from_numpy((total.astype(np.float64) / self.count).astype(np.float32))


def _npz(path: Path) -> Any:
    """An open .npz without pickle; a damaged file is a clear error."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise SpectraError(f"The statistics file {path} is not a readable .npz archive ({err}). Copy it again; an "
                           "interrupted download leaves such files.") from None


def _member(data: Any, key: str, path: Path) -> np.ndarray:
    """One member of an open .npz; one that needs pickle (an object array) is refused."""
    if key not in data.files:
        raise SpectraError(f"The statistics file {path} has no {key!r} (it holds {', '.join(data.files)}); expected "
                           f"{LAYOUT}.")
    try:
        return data[key]
    except ValueError as err:
        raise SpectraError(
            f"The statistics file {path} stores {key!r} as pickled Python objects ({err}). spectra never unpickles a "
            "file (it could run code): save the arrays as plain numbers, as the official layer_stats code does."
        ) from None
    except (OSError, zipfile.BadZipFile) as err:
        raise SpectraError(f"The statistics file {path} is damaged ({err}). Copy it again.") from None


def read_stats_file(path: Path) -> StatsFile:
    """The header of one statistics file (no matrix read), or a SpectraError saying what is wrong with it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        manifest_path = path.with_suffix(".json")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            return StatsFile(int(manifest["key"]["layer"]), path, "spectra", int(manifest["n_tokens"]),
                             manifest["key"].get("n_samples"))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SpectraError(f"{path} is not a spectra statistics cache entry: its manifest {manifest_path.name} "
                               f"cannot be read ({err}). Expected {LAYOUT}.") from None
    match = NPZ_NAME.match(path.name)
    if path.suffix != ".npz" or match is None:
        raise SpectraError(f"Cannot tell which layer {path} holds statistics for: its name is not in {LAYOUT}. Keep "
                           "the name the official code gave it.")
    layers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", match["module"])
    if not layers:
        raise SpectraError(f"The statistics file name {path.name} names no layer number in its module "
                           f"{match['module']!r}; expected {LAYOUT}.")
    with _npz(path) as data:
        members = {key: _member(data, key, path) for key in data.files if key != NPZ_MOMENT}
        if NPZ_MOMENT not in data.files or NPZ_COUNT not in members:
            raise SpectraError(f"The statistics file {path} holds {', '.join(data.files)}, not a second moment "
                               f"({NPZ_MOMENT} and {NPZ_COUNT}); expected {LAYOUT}.")
    size = members.get("sample_size")
    documents = int(size) if size is not None and np.ndim(size) == 0 and np.isfinite(size) else None
    count = int(members[NPZ_COUNT])
    if count < 1:
        raise SpectraError(f"The statistics file {path} records {count} tokens; it holds no statistics.")
    return StatsFile(int(layers[-1]), path, "layer_stats", count, documents, match["module"])


def locate_statistics(source: Path, layers: Sequence[int], n_samples: int | None) -> dict[int, StatsFile]:
    """One statistics file per edited layer from a file or a directory (searched recursively).

    Where a directory holds several files for a layer, the one computed over ``n_samples``
    documents (mom2_n_samples) is taken; any other ambiguity, and a missing layer, is an error.
    """
    source = Path(source).expanduser()
    if source.is_file():
        found = [read_stats_file(source)]
    elif source.is_dir():
        paths = sorted(source.rglob("*.npz")) + [p for p in sorted(source.rglob("*.safetensors"))
                                                   if p.with_suffix(".json").is_file()]
        found = [read_stats_file(path) for path in paths]
    else:
        raise SpectraError(f"--stats {source} is neither a statistics file nor a directory. Give {LAYOUT}, or a "
                           "directory holding them.")
    chosen: dict[int, StatsFile] = {}
    for layer in layers:
        candidates = [f for f in found if f.layer == layer]
        if len(candidates) > 1:
            candidates = [f for f in candidates if f.sample_size == n_samples] or candidates
        if len(candidates) != 1:
            have = sorted({f.layer for f in found})
            what = ("none" if not candidates else
                    "several: " + ", ".join(str(f.path) for f in candidates) + "; keep one, or set mom2_n_samples to "
                    "the sample size of the one to use")
            raise SpectraError(f"--stats {source}: the editor edits layers {list(layers)}, and for layer {layer} it "
                               f"found {what} (files found cover layers {have or 'none'}). Give one file per edited "
                               f"layer in {LAYOUT}.")
        chosen[layer] = candidates[0]
    return chosen


class ImportedStatistics:
    """Key statistics read from precomputed files: the same interface as ``KeyStatistics``, never computed here.

    Each matrix is checked against its layer when first used: square, as wide as the layer's
    down projection takes inputs, finite.
    """

    def __init__(self, files: dict[int, StatsFile]) -> None:
        self.files = files
        self._memo: dict[int, torch.Tensor] = {}

    def second_moments(self, model: LoadedModel, layers: Sequence[int], fingerprint: str | None = None,
                       compute: bool = True) -> dict[int, torch.Tensor]:
        """C per layer (float32, on the model's device); ``fingerprint`` and ``compute`` do not apply to files."""
        missing = [layer for layer in layers if layer not in self.files]
        if missing:
            raise SpectraError(f"The imported statistics cover layers {sorted(self.files)}, not {missing}. Give files "
                               "for every edited layer with --stats.")
        result = {}
        for layer in layers:
            if layer not in self._memo:
                self._memo[layer] = self._checked(model, self.files[layer])
            result[layer] = self._memo[layer].to(model.device)
        return result

    @staticmethod
    def _checked(model: LoadedModel, stats: StatsFile) -> torch.Tensor:
        moment = stats.moment()
        d_k = model.adapter.shape(Site(stats.layer, "mlp.down"))[1]
        if tuple(moment.shape) != (d_k, d_k):
            raise SpectraError(
                f"The statistics file {stats.path} holds a {'x'.join(map(str, moment.shape))} moment, but layer "
                f"{stats.layer} of {model.name} has {d_k}-wide keys (its down projection's input): the file belongs to "
                "another model or module. Give the statistics of this model's down projections."
            )
        if not bool(torch.isfinite(moment).all()):
            raise SpectraError(f"The statistics file {stats.path} holds NaN or infinite values. Recompute or copy it "
                               "again.")
        return moment
