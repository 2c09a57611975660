"""The Editor interface and the one layer loop every MEMIT-family editor shares (solve hooks per method)."""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Protocol, Sequence

import torch

from spectra.data.records import EditRequest
from spectra.editing.core import (
    PromptRows, ZSettings, check_request, generate_templates, key_rows, keys_and_hidden, optimize_targets,
)
from spectra.editing.filters import ReviveFilter, SiteFilter, begin_round
from spectra.editing.hparams import MemitHParams
from spectra.editing.stats import Corpus, KeyStatistics, MomentSource, StatsCache, model_fingerprint
from spectra.errors import SpectraError
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.spectral import Delta

logger = logging.getLogger(__name__)


class Editor(Protocol):
    """What the edit loop calls: prepare once, then one ``apply_round`` per batch of requests."""

    name: str
    #: called with the steps done after every z-optimisation step of a round (a progress display sets it)
    on_step: Callable[[int], None] | None

    @property
    def z_steps(self) -> int:
        """The z-optimisation steps one round runs at most (0 for an editor that optimises none per round)."""

    def prepare(self, model: LoadedModel, requests: list[EditRequest]) -> None:
        """Once, before round 1, on the unedited model (templates, statistics, P, NSE's z)."""

    def apply_round(self, model: LoadedModel, requests: list[EditRequest], filter: SiteFilter) -> dict[Site, Delta]:
        """Edit the model in place; return the (filtered) update written to each site."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All cross-round state, for checkpoints."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned (instead of ``prepare`` when resuming)."""

    def edited_sites(self, model: LoadedModel) -> list[Site]:
        """The sites this editor writes."""


def pack_json(value: object) -> torch.Tensor:
    """A JSON value as a uint8 tensor, so string state (templates) fits a tensor state dict."""
    return torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8)


def unpack_json(tensor: torch.Tensor) -> object:
    """Inverse of ``pack_json``."""
    return json.loads(bytes(tensor.tolist()).decode("utf-8"))


def down_site(layer: int) -> Site:
    """The MLP down projection of ``layer``: the matrix every MEMIT-family editor writes."""
    return Site(layer, "mlp.down")


class MasterWeights:
    """float32 masters of the edited matrices of a lower-precision model (gotcha 5).

    Small updates rounded into bf16/fp16 weights would be lost round after round; the editor adds
    every update to the float32 master and writes the rounded master. A master that no longer
    matches the model (someone else wrote the site, e.g. restored it between arms) is dropped.
    Float32 models need no masters: their weights are read exactly.
    """

    def __init__(self) -> None:
        self.masters: dict[Site, torch.Tensor] = {}

    def get(self, model: LoadedModel, site: Site) -> torch.Tensor:
        """The site's weight in float32, (out, in)."""
        current = model.adapter.read(site)
        master = self.masters.get(site)
        if master is not None and torch.equal(master.to(current.dtype), current):
            return master.clone()
        self.masters.pop(site, None)
        return current.float()

    def set(self, model: LoadedModel, site: Site, weight: torch.Tensor) -> None:
        """Write ``weight`` (float32) into the model, keeping it as master if the model rounds it."""
        model.adapter.write(site, weight)
        if model.dtype != torch.float32:
            self.masters[site] = weight.detach().float().clone()


class KeyCache:
    """Running sum of K K^T per layer over earlier rounds' requests (MEMIT_seq, AlphaEdit, NSE).

    Updated after each round with keys recomputed on the edited model; float32, on the model's device.
    """

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}

    def get(self, layer: int, d_k: int, device: torch.device) -> torch.Tensor:
        """The layer's sum (zeros before the first round), on ``device``."""
        if layer not in self.sums:
            self.sums[layer] = torch.zeros(d_k, d_k, device=device)
        elif self.sums[layer].device != device:
            self.sums[layer] = self.sums[layer].to(device)
        return self.sums[layer]

    def update(self, model: LoadedModel, rows: PromptRows, layers: Sequence[int], batch_size: int) -> None:
        """Add this round's K K^T for every layer (one forward pass for all layers)."""
        keys, _ = keys_and_hidden(model, rows, layers, None, batch_size)
        for layer, K in keys.items():
            self.get(layer, K.shape[0], K.device).add_(K @ K.T)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sums as ``key_cache.<layer>`` tensors (CPU)."""
        return {f"key_cache.{layer}": value.cpu() for layer, value in self.sums.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore saved sums (moved to the model's device on first use)."""
        self.sums = {
            int(name.split(".", 1)[1]): value.float().clone() for name, value in state.items() if name.startswith("key_cache.")
        }


def memit_solve(
    keys: torch.Tensor, residual: torch.Tensor, covariance: torch.Tensor, weight: float,
    extra: torch.Tensor | None = None, ridge: float = 0.0, protected_inputs: torch.Tensor | None = None,
) -> Delta:
    """MEMIT's closed form Delta = R K^T (lambda C + K K^T [+ extra] [+ rho I])^-1, factored as R @ (A^-1 K)^T.

    Minimises ||Delta K - R||^2 + lambda tr(Delta C Delta^T) (+ ||Delta K_p||^2 with ``extra`` =
    K_p K_p^T, MEMIT_seq) (+ rho ||Delta||^2). The ridge rho = ``ridge`` x mean ||k||^2 of the keys
    is scale-free; it matters only when C is rank-deficient (a small model's keys fill few of
    d_k directions), where the plain solve spends huge weights on directions no key uses.
    With ``protected_inputs`` V (d_k, k, orthonormal columns: REVIVE's V_k placed inside the solve,
    reference 12.2) the same objective is minimised subject to Delta V = 0: with Q = I - V V^T,
    Delta = R (Q K)^T (Q A Q + V V^T)^-1, whose right factor lies in range(Q). Q is never formed.
    Solved in float64 with a linear solve (no explicit inverse); A is symmetric, so
    (A^-1 K)^T = K^T A^-1. The factors are returned in float32, rank <= n.
    """
    K = keys.double()
    A = weight * covariance.double() + K @ K.T
    if extra is not None:
        A = A + extra.double()
    if ridge > 0:
        A = A + ridge * float(K.pow(2).sum(0).mean()) * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    if protected_inputs is not None:
        A, K = _restrict(A, K, protected_inputs.to(device=A.device, dtype=A.dtype))
    right = torch.linalg.solve(A, K)
    return Delta.factored(residual.float(), right.float())


def _restrict(A: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q A Q + V V^T, Q K) for Q = I - V V^T, in O(d^2 k): the normal equations on span(V)'s complement."""
    AV = A @ V
    restricted = A - V @ AV.T - AV @ V.T + V @ (V.T @ AV) @ V.T + V @ V.T
    return (restricted + restricted.T) / 2, K - V @ (V.T @ K)


class LocateEditEditor(ABC):
    """MEMIT and its descendants: z at the last layer, residual spread over layers with in-loop writes.

    Subclasses supply the per-layer solve (``_solve``) and may shape the update before the filter
    (``_shape_update``, RECT), add method state (``_prepare_method``, ``_finish_round``), or replace
    the round (NSE). Everything else — templates, statistics, keys, z, filter placement, the write
    — lives here once.
    """

    name: ClassVar[str] = ""
    hparams_class: ClassVar[type[MemitHParams]] = MemitHParams

    def __init__(
        self, hparams: MemitHParams, corpus: Corpus | None = None, *, statistics: MomentSource | None = None,
        stats_cache: StatsCache | None = None, progress: bool = True,
    ) -> None:
        if not isinstance(hparams, self.hparams_class):
            raise SpectraError(f"{type(self).__name__} needs {self.hparams_class.__name__}, not {type(hparams).__name__}.")
        if statistics is None and corpus is not None:
            statistics = KeyStatistics(
                corpus, hparams.mom2_n_samples, hparams.max_length, hparams.batch_size, stats_cache, progress
            )
        self.hparams = hparams
        self.statistics = statistics
        self.on_step: Callable[[int], None] | None = None
        self.templates: list[str] | None = None
        self.fingerprint: str | None = None
        self._covariances: dict[int, torch.Tensor] = {}
        self._weights = MasterWeights()

    # -- interface ------------------------------------------------------------------------
    @property
    def z_steps(self) -> int:
        """The z-optimisation steps one round runs at most (v_num_grad_steps; early stops end it sooner)."""
        return self.hparams.v_num_grad_steps

    def edited_sites(self, model: LoadedModel) -> list[Site]:
        """The down projections of the edited layers (checked against the model's depth)."""
        n_layers = model.adapter.n_layers
        for layer in self.hparams.layers:
            if layer >= n_layers:
                raise SpectraError(
                    f"{self.name}: edited layer {layer} is out of range: {model.name} has layers 0..{n_layers - 1}."
                )
        return [down_site(layer) for layer in self.hparams.layers]

    def prepare(self, model: LoadedModel, requests: list[EditRequest]) -> None:
        """Templates and statistics from the unedited model, then the method's own preparation."""
        self.edited_sites(model)
        for request in requests:
            check_request(request)
        if self.templates is None:
            generator = torch.Generator().manual_seed(self.hparams.seed)
            self.templates = generate_templates(
                model, self.hparams.context_prompts, self.hparams.context_length, self.hparams.context_top_k, generator
            )
        if self.fingerprint is None:
            self.fingerprint = model_fingerprint(model)
        self._load_covariances(model, compute=True)
        self._prepare_method(model, requests)

    def apply_round(self, model: LoadedModel, requests: list[EditRequest], filter: SiteFilter) -> dict[Site, Delta]:
        """One round: z for the requests, then the layer loop with ``filter`` before every write."""
        if not requests:
            return {}
        self._ready(model)
        begin_round(filter, model)
        rows = key_rows(model, requests, self.templates, self.hparams.key_position)
        written = self._edit(model, requests, rows, filter)
        return self._finish_round(model, requests, rows, written)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Templates and statistics identity (as JSON bytes), fp32 masters, and the method's state."""
        if self.templates is None:
            raise SpectraError(f"{self.name}: nothing to save before prepare() was called.")
        state = {"meta": pack_json({"editor": self.name, "templates": self.templates, "fingerprint": self.fingerprint})}
        state.update({f"master.{site}": w.cpu() for site, w in self._weights.masters.items()})
        state.update(self._method_state())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a ``state_dict``; statistics are then read from the cache on first use."""
        meta = unpack_json(state["meta"])
        if meta["editor"] != self.name:
            raise SpectraError(f"This state belongs to a {meta['editor']!r} editor, not {self.name!r}.")
        self.templates = list(meta["templates"])
        self.fingerprint = meta["fingerprint"]
        self._covariances = {}
        self._weights.masters = {
            Site.parse(name.split(".", 1)[1]): value.float() for name, value in state.items() if name.startswith("master.")
        }
        self._load_method_state(state)

    # -- shared machinery -----------------------------------------------------------------
    def covariance(self, model: LoadedModel, layer: int) -> torch.Tensor:
        """C = E[k k^T] of the unedited model at ``layer`` (float32, on the model's device)."""
        if layer not in self._covariances:
            self._load_covariances(model, compute=False)
        return self._covariances[layer]

    def z_settings(self) -> ZSettings:
        """The z-optimisation knobs from the hyperparameters."""
        h = self.hparams
        return ZSettings(
            layer=h.z_layer, key_position=h.key_position, steps=h.v_num_grad_steps, lr=h.v_lr,
            weight_decay=h.v_weight_decay, clamp_norm_factor=h.clamp_norm_factor, kl_factor=h.kl_factor,
            early_stop_loss=h.early_stop_loss, batch_size=h.batch_size,
        )

    def _load_covariances(self, model: LoadedModel, compute: bool) -> None:
        """Fetch C for every edited layer not yet held (computing it only if ``compute``)."""
        missing = [layer for layer in self.hparams.layers if layer not in self._covariances]
        if not missing:
            return
        if self.statistics is None:
            raise SpectraError(
                f"{self.name} needs key statistics: construct it with a corpus (a list of texts or a text file)."
            )
        self._covariances.update(self.statistics.second_moments(model, missing, self.fingerprint, compute=compute))

    def _ready(self, model: LoadedModel) -> None:
        """Refuse to edit before ``prepare``/``load_state_dict``, or a model too shallow for the layers."""
        if self.templates is None:
            raise SpectraError(f"{self.name}: call prepare(model, requests) (or load_state_dict) before apply_round.")
        self.edited_sites(model)

    def _edit(self, model: LoadedModel, requests: list[EditRequest], rows: PromptRows, filter: SiteFilter) -> dict[Site, Delta]:
        """Compute z on the current model and spread the residual over the layers."""
        z = optimize_targets(model, requests, self.templates, self.z_settings(), self.on_step)
        return self._spread(model, rows, z, filter)

    def _spread(self, model: LoadedModel, rows: PromptRows, z: torch.Tensor, filter: SiteFilter) -> dict[Site, Delta]:
        """The layer loop: keys and H on the current model, R / (layers left), solve, filter, write.

        Keys and H are recomputed after every write, so each layer sees the lower layers' (filtered)
        updates and absorbs what they left — including what the filter removed.
        """
        layers = self.hparams.layers
        written: dict[Site, Delta] = {}
        for i, layer in enumerate(layers):
            site = down_site(layer)
            keys, hidden = keys_and_hidden(model, rows, [layer], self.hparams.z_layer, self.hparams.batch_size)
            residual = (z - hidden) / (len(layers) - i)
            weight = self._weights.get(model, site)
            delta = self._shape_update(site, self._solve(model, site, keys[layer], residual, filter), weight)
            delta = filter(site, delta)
            self._weights.set(model, site, weight + delta.to_dense().to(weight))
            written[site] = delta
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "%s %s: mean residual norm %.4g, update norm %.4g",
                    self.name, site, float(residual.norm(dim=0).mean()), delta.frobenius_norm(),
                )
        return written

    # -- hooks ----------------------------------------------------------------------------
    @abstractmethod
    def _solve(self, model: LoadedModel, site: Site, keys: torch.Tensor, residual: torch.Tensor, filter: SiteFilter) -> Delta:
        """The method's update for one layer: keys (d_k, n), residual (d_v, n) -> Delta (d_v, d_k)."""

    def _protected_inputs(self, site: Site, filter: SiteFilter) -> torch.Tensor | None:
        """REVIVE's V_k for ``site`` when the filter is REVIVE and sits inside the solve, else None."""
        if self.hparams.revive_placement == "in_solve" and isinstance(filter, ReviveFilter):
            return filter.basis(site).Vk
        return None

    def _shape_update(self, site: Site, delta: Delta, weight: torch.Tensor) -> Delta:
        """Reshape a solved update before the filter (RECT masks it); identity by default."""
        return delta

    def _prepare_method(self, model: LoadedModel, requests: list[EditRequest]) -> None:
        """Method-specific preparation on the unedited model; nothing by default."""

    def _finish_round(
        self, model: LoadedModel, requests: list[EditRequest], rows: PromptRows, written: dict[Site, Delta]
    ) -> dict[Site, Delta]:
        """After all layers are written (key caches, PRUNE's restraint); returns what was written."""
        return written

    def _method_state(self) -> dict[str, torch.Tensor]:
        """Method-specific cross-round state for ``state_dict``; nothing by default."""
        return {}

    def _load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``_method_state`` saved."""
