"""What ``--protect activation`` and ``--protect fisher`` measure on the original model: a score per singular triplet."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from spectra.editing.stats import MomentSource
from spectra.errors import SpectraError
from spectra.evaluation.gradients import general_loss_gradients
from spectra.experiments.common import GeneralOptions, spare_general_items
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.spectral import Spectrum, activation_scores, fisher_scores

#: General-task items per task, held out from the general-ability probe, whose loss gradients the fisher criterion
#: averages; and items per mini-batch (the Fisher estimate averages over 4 x 64 / 16 = 16 mini-batches on 4 tasks).
FISHER_ITEMS_PER_TASK = 64
FISHER_BATCH = 16


def protection_scores(
    criterion: str, model: LoadedModel, spectra0: Mapping[Site, Spectrum], statistics: MomentSource | None,
    general: GeneralOptions, seed: int,
) -> dict[Site, torch.Tensor]:
    """Per site of ``spectra0`` (the original weights' spectra): the criterion's score of every triplet; {} for
    criteria ranked by sigma. Call it on the unedited model.

    activation: v_i^T C v_i with C the editor's key statistics E[k k^T] (mlp.down sites, whose input is
    the MEMIT key); fisher: the mean over mini-batches of held-out general-task items of
    (u_i^T G v_i)^2, G the gradient of the gold answers' NLL.
    """
    sites = list(spectra0)
    if criterion == "activation":
        others = [str(site) for site in sites if site.kind != "mlp.down"]
        if others:
            raise SpectraError(
                f"--protect activation ranks input directions by the key statistics E[k k^T], which spectra has for the "
                f"MLP down projections only; {', '.join(others)} would need their own input statistics. Use another "
                "criterion for an editor that writes other matrices."
            )
        if statistics is None:
            raise SpectraError("--protect activation needs the editor's key statistics (a corpus or --stats).")
        moments = statistics.second_moments(model, sorted({site.layer for site in sites}))
        return {site: activation_scores(spectra0[site], moments[site.layer]) for site in sites}
    if criterion == "fisher":
        items = spare_general_items(model, general, seed, FISHER_ITEMS_PER_TASK)
        return fisher_scores(dict(spectra0), general_loss_gradients(model, items, sites, FISHER_BATCH))
    return {}

