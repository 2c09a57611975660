"""PRUNE: sequential MEMIT plus a log restraint of the accumulated update's large singular values (section 7)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from spectra.data.records import EditRequest
from spectra.editing.core import PromptRows
from spectra.editing.hparams import PruneHParams
from spectra.editing.memit import MemitEditor
from spectra.editing.stats import Corpus
from spectra.errors import SpectraError
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.spectral import Delta


def restraint(sigma: torch.Tensor, sigma_bar: float, base: float) -> torch.Tensor:
    """F(s) = s below s_bar, log_base(s) - log_base(s_bar) + s_bar from s_bar on (continuous at s_bar)."""
    above = (torch.log(sigma.clamp_min(sigma_bar)) - math.log(sigma_bar)) / math.log(base) + sigma_bar
    return torch.where(sigma < sigma_bar, sigma, above)


def restrain(update: torch.Tensor, sigma_bar: float, base: float) -> torch.Tensor:
    """The update with each singular value s >= s_bar replaced by F(s), singular vectors unchanged.

    Only the triplets above s_bar change, so Delta' = Delta + sum_{s_i >= s_bar} (F(s_i) - s_i) u_i v_i^T;
    they are the top eigenpairs of the smaller Gram matrix (float64), far above round-off, so no
    full SVD of the (d_v, d_k) update is needed and everything below s_bar is left exactly as is.
    """
    D = update.double()
    wide = D.shape[0] <= D.shape[1]
    gram = D @ D.T if wide else D.T @ D
    values, vectors = torch.linalg.eigh(gram)
    sigma = values.clamp_min(0).sqrt()
    big = sigma >= sigma_bar
    if not bool(big.any()):
        return update.clone()
    s = sigma[big]
    side = vectors[:, big]  # left vectors u_i if wide, right vectors v_i otherwise
    other = (D.T @ side if wide else D @ side) / s  # the matching v_i (or u_i)
    change = (restraint(s, sigma_bar, base) - s)
    correction = (side * change) @ other.T if wide else (other * change) @ side.T
    return (D + correction).to(update.dtype)


class PruneEditor(MemitEditor):
    """MEMIT round after round; the accumulated W - W0 of each site is restrained against sigma_max(W0).

    The restrained weight is W0 + Delta' (the PRUNE paper), not the AlphaEdit repository's
    W_n + Delta', which counts the accumulated update twice (reference gotcha 12).

    Schedule: by default the restraint runs at the end of every round, so the model each round's
    measurements see (and the next round edits) is the restrained one — what a deployed sequential
    editor would do. The reference code restrains once after the last round; ``restrain_every_round
    = False`` reproduces that, with ``finalize(model)`` called by the loop after the last round.
    A REVIVE filter composes: filtered rounds sum to an update with no U_k / V_k components, and the
    restraint rebuilds it from its own singular vectors, which stay in those complements.
    """

    name: ClassVar[str] = "prune"
    hparams_class: ClassVar[type[PruneHParams]] = PruneHParams

    def __init__(self, hparams: PruneHParams, corpus: Corpus | None = None, **kwargs: Any) -> None:
        super().__init__(hparams, corpus, **kwargs)
        self.originals: dict[Site, torch.Tensor] = {}
        self._sigma_bar: dict[Site, float] = {}

    def _prepare_method(self, model: LoadedModel, requests: list[EditRequest]) -> None:
        for site in self.edited_sites(model):
            self.originals[site] = self._weights.get(model, site).clone()

    def sigma_bar(self, site: Site) -> float:
        """sigma_max(W0) of ``site`` (computed once)."""
        if site not in self._sigma_bar:
            self._sigma_bar[site] = float(torch.linalg.matrix_norm(self.originals[site].double(), ord=2))
        return self._sigma_bar[site]

    def restrain_model(self, model: LoadedModel) -> dict[Site, Delta]:
        """Restrain every edited site now; returns each site's weight change (dense)."""
        if not self.originals:
            raise SpectraError("prune: call prepare(model, requests) (or load_state_dict) before restraining.")
        changes: dict[Site, Delta] = {}
        for site, original in self.originals.items():
            weight = self._weights.get(model, site)
            original = original.to(weight.device)
            restrained = original + restrain(weight - original, self.sigma_bar(site), self.hparams.log_base)
            self._weights.set(model, site, restrained)
            changes[site] = Delta.of(restrained - weight)
        return changes

    def finalize(self, model: LoadedModel) -> dict[Site, Delta]:
        """End-of-run restraint for ``restrain_every_round=False`` (the reference schedule); else nothing."""
        if self.hparams.restrain_every_round:
            return {}
        return self.restrain_model(model)

    def _finish_round(
        self, model: LoadedModel, requests: list[EditRequest], rows: PromptRows, written: dict[Site, Delta]
    ) -> dict[Site, Delta]:
        """With the every-round schedule, the round's net write is the MEMIT update plus the restraint."""
        if not self.hparams.restrain_every_round:
            return written
        changes = self.restrain_model(model)
        return {site: Delta.of(delta.to_dense() + changes[site].to_dense()) for site, delta in written.items()}

    def _method_state(self) -> dict[str, torch.Tensor]:
        return {f"original.{site}": weight.cpu() for site, weight in self.originals.items()}

    def _load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        self.originals = {
            Site.parse(name.split(".", 1)[1]): value.float().clone() for name, value in state.items()
            if name.startswith("original.")
        }
        self._sigma_bar = {}
