"""AlphaEdit: MEMIT's residuals solved inside the null space of the preserved keys (reference section 5)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from spectra.data.records import EditRequest
from spectra.editing.base import KeyCache, LocateEditEditor
from spectra.editing.core import PromptRows
from spectra.editing.filters import SiteFilter
from spectra.editing.hparams import AlphaEditHParams
from spectra.editing.stats import Corpus
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.spectral import Delta

logger = logging.getLogger(__name__)


def null_space_projector(covariance: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U_0 U_0^T over the eigenvectors of the MEAN covariance C with eigenvalue < ``threshold``.

    C is symmetric PSD, so its eigendecomposition is its SVD; float64 keeps the small eigenvalues
    (the ones that matter here) accurate. The threshold is absolute, hence C must be the mean,
    never the raw sum of k k^T (reference gotcha 6).
    """
    values, vectors = torch.linalg.eigh(covariance.double())
    null = vectors[:, values < threshold]
    return (null @ null.T).float()


def restricted_projector(P: torch.Tensor, Vk: torch.Tensor) -> torch.Tensor:
    """Q = P - P V_k (V_k^T P V_k)^+ V_k^T P: the projector onto range(P) minus span(V_k) (reference 12.2).

    Q = Q^T = Q^2, Q V_k = 0 and range(Q) is inside range(P); a k x k pseudo-inverse, float64.
    """
    P64, V = P.double(), Vk.to(device=P.device, dtype=torch.float64)
    PV = P64 @ V
    Q = P64 - PV @ torch.linalg.pinv(V.T @ PV, hermitian=True) @ PV.T
    return ((Q + Q.T) / 2).float()


def alphaedit_solve(
    keys: torch.Tensor, residual: torch.Tensor, projector: torch.Tensor, key_cache: torch.Tensor, l2: float
) -> Delta:
    """Delta = R K^T P [(K K^T + K_p K_p^T) P + l2 I]^-1, factored as R @ (M^-1 P K)^T with M = P A + l2 I.

    This is the transpose of the reference's X = [P (K K^T + K_p K_p^T) + l2 I]^-1 P K R^T. Because
    M (I - P) = l2 (I - P), every solution satisfies Delta = Delta P: its row space lies in range(P).
    Solved in float64 (the reference uses float32 with the same l2).
    """
    K, P = keys.double(), projector.double()
    M = P @ (K @ K.T + key_cache.double()) + l2 * torch.eye(P.shape[0], dtype=torch.float64, device=P.device)
    right = torch.linalg.solve(M, P @ K)
    return Delta.factored(residual.float(), right.float())


class AlphaEditEditor(LocateEditEditor):
    """AlphaEdit with its cross-round key cache; REVIVE inside the solve (default) or after it.

    "in_solve" solves with Q (range(P) without span(V_k)) instead of P, so the update satisfies both
    key-side constraints exactly and is the constrained optimum; the filter applied afterwards then
    only acts on the output side, where post-hoc projection is optimal. "after" is the REVIVE
    paper's post-hoc filter: the left side keeps AlphaEdit's guarantee Delta (I - P) = 0, the right
    side trades it away (reference 12.2).
    """

    name: ClassVar[str] = "alphaedit"
    hparams_class: ClassVar[type[AlphaEditHParams]] = AlphaEditHParams

    def __init__(self, hparams: AlphaEditHParams, corpus: Corpus | None = None, **kwargs: Any) -> None:
        super().__init__(hparams, corpus, **kwargs)
        self.key_cache = KeyCache()
        self._projectors: dict[int, torch.Tensor] = {}

    def projector(self, model: LoadedModel, layer: int) -> torch.Tensor:
        """P for ``layer`` (built once from the unedited model's statistics, logged with its dimension)."""
        if layer not in self._projectors:
            P = null_space_projector(self.covariance(model, layer), self.hparams.nullspace_threshold)
            dim = round(float(torch.trace(P)))
            logger.info("alphaedit layer %d: null space of dimension %d of %d", layer, dim, P.shape[0])
            self._projectors[layer] = P
            # P replaces C for this editor; do not hold both d_k x d_k matrices per layer.
            self._covariances.pop(layer, None)
        return self._projectors[layer]

    def solve_projector(self, model: LoadedModel, site: Site, filter: SiteFilter) -> torch.Tensor:
        """P, or Q when REVIVE sits inside the solve."""
        P = self.projector(model, site.layer)
        protected = self._protected_inputs(site, filter)
        return P if protected is None else restricted_projector(P, protected)

    def _prepare_method(self, model: LoadedModel, requests: list[EditRequest]) -> None:
        for layer in self.hparams.layers:
            self.projector(model, layer)

    def _solve(self, model: LoadedModel, site: Site, keys: torch.Tensor, residual: torch.Tensor, filter: SiteFilter) -> Delta:
        projector = self.solve_projector(model, site, filter)
        cache = self.key_cache.get(site.layer, keys.shape[0], keys.device)
        return alphaedit_solve(keys, residual, projector, cache, self.hparams.l2)

    def _finish_round(
        self, model: LoadedModel, requests: list[EditRequest], rows: PromptRows, written: dict[Site, Delta]
    ) -> dict[Site, Delta]:
        self.key_cache.update(model, rows, self.hparams.layers, self.hparams.batch_size)
        return written

    def _method_state(self) -> dict[str, torch.Tensor]:
        return self.key_cache.state_dict()

    def _load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        self.key_cache.load_state_dict(state)
        self._projectors = {}
