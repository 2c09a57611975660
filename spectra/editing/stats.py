"""Second-moment statistics C = E[k k^T] of the MEMIT keys over a corpus, cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file

from spectra.models.hooks import StopForward, capture_inputs, stop_after
from spectra.errors import SpectraError
from spectra.progress import stderr_progress
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.models.tokens import pad_right
from spectra.spectral import default_cache_root

logger = logging.getLogger(__name__)

#: Bumped when the way statistics are computed changes, so older cache entries are not reused.
STATS_VERSION = 1

#: Forward throughputs (FLOP/s) used only to warn before a long computation; rough on purpose.
_ASSUMED_FLOPS = {"cpu": 5e10, "cuda": 5e13}

Corpus = Sequence[str] | Path | str


class MomentSource(Protocol):
    """Where an editor gets C = E[k k^T] per layer: computed from a corpus (KeyStatistics) or imported files."""

    def second_moments(self, model: LoadedModel, layers: Sequence[int], fingerprint: str | None = None,
                       compute: bool = True) -> dict[int, torch.Tensor]:
        """C per layer, float32, on the model's device."""


def read_corpus(corpus: Corpus, n_samples: int | None) -> list[str]:
    """The documents of ``corpus``: a list of strings, or a UTF-8 text file with one document per line.

    A bare ``str`` is a file path, never a sequence of one-character documents.
    """
    if isinstance(corpus, str):
        corpus = Path(corpus)
    if isinstance(corpus, Path):
        if not corpus.is_file():
            raise SpectraError(f"The statistics corpus {corpus} does not exist; give a text file, one document per line.")
        documents = [line.strip() for line in corpus.read_text(encoding="utf-8").splitlines()]
    else:
        documents = [str(doc).strip() for doc in corpus]
    documents = [doc for doc in documents if doc]
    if not documents:
        raise SpectraError("The statistics corpus is empty; give at least one non-empty document.")
    return documents if n_samples is None else documents[:n_samples]


def corpus_fingerprint(documents: Sequence[str]) -> str:
    """A content hash of the documents (order matters: the first n are the sample)."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def model_fingerprint(model: LoadedModel) -> str:
    """A cheap hash of 64 evenly strided entries of every parameter.

    Local models (the embedded tiny one included) report revision "local", so the revision alone
    cannot tell a retrained model from the old one; a strided sample tells them apart without
    reading (or hashing) the whole model.
    """
    digest = hashlib.sha256()
    for name, param in model.model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class StatsKey:
    """Everything that changes the content of one layer's statistics."""

    model: str
    revision: str
    weights: str
    layer: int
    corpus: str
    n_samples: int
    max_length: int
    dtype: str = "float32"
    version: int = STATS_VERSION

    def digest(self) -> str:
        """A short hash of every field (the file name part that tells entries apart)."""
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:20]


class StatsCache:
    """Safetensors files plus a JSON manifest each, under ``<root>/stats/<model>/``."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root if root is not None else default_cache_root()) / "stats"

    def _paths(self, key: StatsKey) -> tuple[Path, Path]:
        folder = self.root / key.model.replace("/", "_").replace(os.sep, "_")
        stem = f"layer{key.layer}-{key.digest()}"
        return folder / f"{stem}.safetensors", folder / f"{stem}.json"

    def load(self, key: StatsKey) -> torch.Tensor | None:
        """The cached mean C, or None on a miss (or a manifest that does not match the key)."""
        tensor_path, manifest_path = self._paths(key)
        if not (tensor_path.is_file() and manifest_path.is_file()):
            return None
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != key.__dict__:
            return None
        return load_file(str(tensor_path))["mom2"]

    def save(self, key: StatsKey, mom2: torch.Tensor, n_tokens: int) -> None:
        """Write the mean C and its manifest (key, token count, shape, time)."""
        tensor_path, manifest_path = self._paths(key)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mom2": mom2.contiguous().cpu()}, str(tensor_path))
        manifest = {"key": key.__dict__, "n_tokens": n_tokens, "shape": list(mom2.shape), "created": time.time()}
        manifest_path.write_text(json.dumps(manifest, indent=1))


class KeyStatistics:
    """Per-layer C = E[k k^T] of the down-projection input over every non-padding corpus token.

    One object per corpus; results are memoised in the object and cached on disk. The statistics
    must describe the *unedited* model: the ``fingerprint`` argument pins the weights they were computed
    from, so a resumed run (edited weights) finds the original statistics instead of recomputing.
    """

    def __init__(
        self, corpus: Corpus, n_samples: int | None = None, max_length: int = 1024, batch_size: int = 64,
        cache: StatsCache | None = None, progress: bool = True, batch_tokens: int = 16384,
    ) -> None:
        self.documents = read_corpus(corpus, n_samples)
        self.corpus_id = corpus_fingerprint(self.documents)
        self.max_length = max_length
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.cache = cache if cache is not None else StatsCache()
        self.progress = progress
        self._memo: dict[StatsKey, torch.Tensor] = {}

    def key(self, model: LoadedModel, layer: int, fingerprint: str) -> StatsKey:
        """The cache key of one layer's statistics for the model whose weights hash to ``fingerprint``."""
        return StatsKey(
            model=model.name, revision=model.revision, weights=fingerprint, layer=layer,
            corpus=self.corpus_id, n_samples=len(self.documents), max_length=self.max_length,
        )

    def second_moments(
        self, model: LoadedModel, layers: Sequence[int], fingerprint: str | None = None, compute: bool = True
    ) -> dict[int, torch.Tensor]:
        """C per layer (float32, on the model's device); missing layers are computed in one pass.

        ``compute=False`` turns a miss into an error: used after a resume, when the model in hand
        is already edited and statistics computed from it would be wrong.
        """
        fingerprint = fingerprint or model_fingerprint(model)
        keys = {layer: self.key(model, layer, fingerprint) for layer in layers}
        found: dict[int, torch.Tensor] = {}
        for layer, key in keys.items():
            cached = self._memo.get(key)
            if cached is None:
                cached = self.cache.load(key)
            if cached is not None:
                self._memo[key] = cached
                found[layer] = cached
        missing = [layer for layer in layers if layer not in found]
        if missing:
            if not compute:
                raise SpectraError(
                    f"Key statistics for layers {missing} of the original {model.name} are not in the cache "
                    f"{self.cache.root}; they cannot be recomputed from an already edited model. Restore the "
                    "cache (or SPECTRA_CACHE) used by the original run."
                )
            sums, n_tokens = accumulate_second_moments(
                model, missing, self.documents, self.max_length, self.batch_size, self.progress, self.batch_tokens
            )
            for layer in missing:
                mean = (sums[layer] / n_tokens).float()
                self.cache.save(keys[layer], mean, n_tokens)
                self._memo[keys[layer]] = mean
                found[layer] = mean
        return {layer: found[layer].to(model.device) for layer in layers}


def _estimated_seconds(model: LoadedModel, n_tokens: int, deepest: int) -> float:
    """Rough forward cost up to the deepest hooked block (2 FLOPs per parameter per token)."""
    blocks = model.adapter.blocks()
    params = sum(p.numel() for block in list(blocks)[: deepest + 1] for p in block.parameters())
    return 2 * params * n_tokens / _ASSUMED_FLOPS.get(model.device.type, _ASSUMED_FLOPS["cpu"])


def accumulate_second_moments(
    model: LoadedModel, layers: Sequence[int], documents: Sequence[str], max_length: int, batch_size: int,
    progress: bool = True, batch_tokens: int = 16384,
) -> tuple[dict[int, torch.Tensor], int]:
    """Sum of k k^T (float64) per layer and the token count, hooking all layers in one forward pass.

    Features are cast to float32 for the per-batch outer products (the reference's mom2_dtype) and
    the batch sums are added into a float64 accumulator, so long corpora do not lose small terms.
    The forward pass stops after the deepest hooked layer. Batches hold at most ``batch_size``
    documents and ``batch_tokens`` padded tokens (long documents of real models come a few at a time).
    """
    rows = [list(model.tokenizer(doc)["input_ids"])[:max_length] for doc in documents]
    rows = [row for row in rows if row]
    n_tokens = sum(len(row) for row in rows)
    seconds = _estimated_seconds(model, n_tokens, max(layers))
    if seconds > 60:
        logger.warning(
            "Key statistics for %s layers %s are not cached: %d tokens x %d layers, roughly %.0f minutes. "
            "They are cached afterwards.", model.name, list(layers), n_tokens, len(layers), seconds / 60,
        )
    d_k = {layer: model.adapter.shape(Site(layer, "mlp.down"))[1] for layer in layers}
    sums = {layer: torch.zeros(d_k[layer], d_k[layer], dtype=torch.float64, device=model.device) for layer in layers}
    with stderr_progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"key statistics ({model.name})", total=n_tokens)
        for features, tokens in _key_batches(model, layers, rows, batch_size, batch_tokens):
            for layer in layers:
                sums[layer] += (features[layer].T @ features[layer]).double()
            bar.advance(task, tokens)
    return sums, n_tokens


def _key_batches(
    model: LoadedModel, layers: Sequence[int], rows: list[list[int]], batch_size: int, batch_tokens: int,
) -> Iterator[tuple[dict[int, torch.Tensor], int]]:
    """Per batch of token rows: every non-padding token's key (n, d_k) per layer in float32, and the token count.

    Rows are sorted by length first, which keeps padding (wasted compute) small inside each batch;
    the forward pass stops after the deepest hooked layer.
    """
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for chunk in _length_batches(sorted(rows, key=len), batch_size, batch_tokens):
        batch = pad_right(chunk, pad).to(model.device)
        mask = batch.attention_mask.bool()
        with capture_inputs(model, layers) as captured, stop_after(model, max(layers)), torch.no_grad():
            try:
                model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            except StopForward:
                pass
        yield {layer: captured[layer][mask].float() for layer in layers}, sum(len(r) for r in chunk)


def sample_keys(
    model: LoadedModel, layers: Sequence[int], documents: Sequence[str], max_tokens: int = 4096, max_length: int = 128,
) -> dict[int, torch.Tensor]:
    """Keys (d_k, n) per layer of the first ``max_tokens`` corpus tokens: the inputs an edited matrix really sees.

    Used to measure an update's functional size (``spectra.spectral.functional_change``).
    """
    rows = [list(model.tokenizer(doc)["input_ids"])[:max_length] for doc in documents]
    picked, total = [], 0
    for row in (r for r in rows if r):
        if total >= max_tokens:
            break
        picked.append(row)
        total += len(row)
    if not picked:
        raise SpectraError("No corpus tokens to sample keys from; give a non-empty corpus.")
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for features, _ in _key_batches(model, layers, picked, batch_size=64, batch_tokens=16384):
        for layer in layers:
            parts[layer].append(features[layer])
    return {layer: torch.cat(parts[layer])[:max_tokens].T.contiguous() for layer in layers}


def _length_batches(rows: list[list[int]], batch_size: int, batch_tokens: int) -> list[list[list[int]]]:
    """Consecutive rows grouped under a row and a padded-token budget (rows sorted by length, so the
    newest row sets the padded width)."""
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    for row in rows:
        if current and (len(current) >= batch_size or (len(current) + 1) * len(row) > batch_tokens):
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches
