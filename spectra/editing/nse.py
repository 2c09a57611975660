"""NSE: neuron-level sequential editing with targets from the unedited model (reference section 8)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Sequence

import torch

from spectra.data.records import EditRequest
from spectra.editing.base import KeyCache, LocateEditEditor, memit_solve
from spectra.editing.core import PromptRows, key_rows, keys_and_hidden, optimize_targets
from spectra.editing.filters import SiteFilter
from spectra.editing.hparams import NseHParams
from spectra.editing.stats import Corpus
from spectra.errors import SpectraError
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.spectral import Delta

logger = logging.getLogger(__name__)


def select_neurons(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the fewest key neurons, by score sum_j |K_rj|, whose cumulative score is <= threshold of the total.

    At least one neuron is kept; threshold 1.0 keeps every neuron with a nonzero score share
    (round-off in the cumulative sum is tolerated so that 1.0 does not drop the last one).
    """
    score = keys.abs().sum(dim=1).double()
    order = torch.argsort(score, descending=True)
    cumulative = torch.cumsum(score[order], dim=0)
    limit = threshold * float(cumulative[-1]) * (1 + 1e-9)
    count = max(1, int((cumulative <= limit).sum()))
    return torch.sort(order[:count]).values


def add_deltas(first: Delta | None, second: Delta) -> Delta:
    """Sum of two updates of one site; factored + factored stays factored (factors concatenated)."""
    if first is None:
        return second
    if first.is_factored and second.is_factored:
        return Delta.factored(torch.cat([first.left, second.left], dim=1), torch.cat([first.right, second.right], dim=1))
    return Delta.of(first.to_dense() + second.to_dense())


class NseEditor(LocateEditEditor):
    """NSE: z for every request fixed on the unedited model, residual-gated sweeps, neuron-restricted solves.

    ``prepare`` computes the targets of all requests before the first round ("weights rewinding"
    for values: targets never see the degrading edited model). Keys and z use the same seeded
    templates (the reference samples two different template sets, section 2.3). Each sweep edits
    only requests whose residual norm lies in (alpha, upper_bound); the solve is MEMIT_seq's
    (lambda C + K_p K_p^T + K K^T) restricted to the selected key neurons, so the update is
    column-sparse before the filter (a right-side REVIVE filter spreads it; the left side keeps it).
    """

    name: ClassVar[str] = "nse"
    hparams_class: ClassVar[type[NseHParams]] = NseHParams

    @property
    def z_steps(self) -> int:
        """None per round: every request's z is optimised once, in ``prepare``, on the unedited model."""
        return 0

    def __init__(self, hparams: NseHParams, corpus: Corpus | None = None, **kwargs: Any) -> None:
        super().__init__(hparams, corpus, **kwargs)
        self.key_cache = KeyCache()
        self.targets: dict[int, torch.Tensor] = {}

    def _prepare_method(self, model: LoadedModel, requests: list[EditRequest]) -> None:
        missing = list({r.case_id: r for r in requests if r.case_id not in self.targets}.values())
        if missing:
            z = optimize_targets(model, missing, self.templates, self.z_settings())
            self.targets.update({r.case_id: z[:, i].clone() for i, r in enumerate(missing)})

    def residual_norms(self, model: LoadedModel, requests: Sequence[EditRequest]) -> torch.Tensor:
        """||z - h|| per request on the current model: what alpha and upper_bound are compared with."""
        rows = self._rows(model, requests)
        _, hidden = keys_and_hidden(model, rows, [], self.hparams.z_layer, self.hparams.batch_size)
        return (self._targets_of(requests, hidden.device) - hidden).norm(dim=0)

    def _edit(self, model: LoadedModel, requests: list[EditRequest], rows: PromptRows, filter: SiteFilter) -> dict[Site, Delta]:
        """Up to max_iterations - 1 sweeps over the requests whose residual norm is in (alpha, upper_bound)."""
        z = self._targets_of(requests, model.device)
        h = self.hparams
        written: dict[Site, Delta] = {}
        for sweep in range(h.max_iterations):
            _, hidden = keys_and_hidden(model, rows, [], h.z_layer, h.batch_size)
            norms = (z - hidden).norm(dim=0)
            active = [i for i, e in enumerate(norms.tolist()) if h.alpha < e < h.upper_bound]
            logger.info("nse sweep %d: %d of %d requests with alpha < ||z - h|| < upper_bound", sweep, len(active), len(requests))
            if not active or sweep == h.max_iterations - 1:
                break
            deltas = self._spread(model, rows.subset(active), z[:, active], filter)
            written = {site: add_deltas(written.get(site), delta) for site, delta in deltas.items()}
        return written

    def _solve(self, model: LoadedModel, site: Site, keys: torch.Tensor, residual: torch.Tensor, filter: SiteFilter) -> Delta:
        """MEMIT_seq's solve on the selected neurons; the right factor is zero on every other key neuron."""
        neurons = select_neurons(keys, self.hparams.neuron_threshold)
        covariance = self.covariance(model, site.layer)[neurons][:, neurons]
        cache = self.key_cache.get(site.layer, keys.shape[0], keys.device)[neurons][:, neurons]
        restricted = memit_solve(
            keys[neurons], residual, covariance, self.hparams.mom2_update_weight, extra=cache, ridge=self.hparams.ridge
        )
        right = torch.zeros(keys.shape[0], keys.shape[1], device=keys.device)
        right[neurons] = restricted.right
        return Delta.factored(restricted.left, right)

    def _finish_round(
        self, model: LoadedModel, requests: list[EditRequest], rows: PromptRows, written: dict[Site, Delta]
    ) -> dict[Site, Delta]:
        self.key_cache.update(model, rows, self.hparams.layers, self.hparams.batch_size)
        return written

    def _targets_of(self, requests: Sequence[EditRequest], device: torch.device) -> torch.Tensor:
        """The prepared z of each request as columns (d, n); an unprepared request is an error."""
        missing = [r.case_id for r in requests if r.case_id not in self.targets]
        if missing:
            raise SpectraError(
                f"nse: no target for requests {missing[:5]}; NSE fixes every target on the unedited model, so "
                "pass all requests of the run to prepare()."
            )
        return torch.stack([self.targets[r.case_id] for r in requests], dim=1).to(device)

    def _rows(self, model: LoadedModel, requests: Sequence[EditRequest]) -> PromptRows:
        return key_rows(model, requests, self.templates, self.hparams.key_position)

    def _method_state(self) -> dict[str, torch.Tensor]:
        state = self.key_cache.state_dict()
        if self.targets:
            ids = sorted(self.targets)
            state["nse.case_ids"] = torch.tensor(ids, dtype=torch.long)
            state["nse.targets"] = torch.stack([self.targets[i].cpu() for i in ids])
        return state

    def _load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        self.key_cache.load_state_dict(state)
        self.targets = {}
        if "nse.case_ids" in state:
            self.targets = {int(i): z.float().clone() for i, z in zip(state["nse.case_ids"].tolist(), state["nse.targets"])}
