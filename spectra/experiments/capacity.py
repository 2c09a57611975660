"""``spectra capacity``: how many edits the protected complement absorbs before new edits stop working, per tau.

REVIVE confines every update to the complement of W0's protected triplets, of rank min(m, n) - k.
Each arm (REVIVE at one tau, and the off arm) edits round after round through drift's loop until
the efficacy of the latest round's own edits falls below a threshold or the budget of rounds is
spent. Every round records that efficacy, the efficacy on all edits so far, and how much of the
complement the accumulated update fills (its rank and effective rank there, the dimension left).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from spectra.editing.loop import Arm, Observer, RoundRecord
from spectra.errors import SpectraError
from spectra.experiments.drift import DriftConfig, EditMetrics, EditSetup, run_edits, triplet_residual
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.spectral import ReviveProjector, Spectrum, complement_usage

if TYPE_CHECKING:
    import pandas as pd

#: complement_usage's results -> the metric names of a capacity run's rows.
USAGE_METRICS = {"rank": "update_rank", "effective_rank": "update_effective_rank",
                 "complement_rank": "complement_rank", "remaining": "remaining_dim"}


@dataclass
class CapacityConfig(DriftConfig):
    """Options of a capacity run: drift's, with ``rounds`` x ``batch_size`` the budget of edits per arm."""

    rounds: int = 10
    batch_size: int | None = 20
    tau: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    eval_records: int = 100
    represent_prompts: int = 0
    #: an arm fails at the first round whose own edits' efficacy (percent) falls below this
    threshold: float = 50.0

    def validate(self) -> None:
        """Drift's checks, and a threshold that some efficacy can fall below."""
        super().validate()
        if not 0.0 < self.threshold <= 100.0:
            raise SpectraError(f"--threshold is an efficacy in percent and must lie in (0, 100]; got {self.threshold}.")


class RoundEfficacy(EditMetrics):
    """Efficacy on the edits of the round just made (round 0: the first round's records, before editing).

    Only the rewrite prompts are scored: efficacy needs nothing else.
    """

    kinds = ("rewrite",)

    def __init__(self, records: Sequence[dict], batch_size: int, seed: int) -> None:
        super().__init__(records, batch_size, batch_size, seed)

    def chosen(self, round: int) -> list[dict]:
        start = (max(1, round) - 1) * self.batch_size
        return self.records[start : start + self.batch_size]

    def __call__(self, arm: Arm, round: int, model: LoadedModel) -> RoundRecord:
        rows = [{**row, "metric": "round_efficacy"} for row in super().__call__(arm, round, model).rows
                if row["metric"] == "efficacy"]
        return RoundRecord(rows=rows)


class ComplementUsage:
    """Per written site: how much of the protected complement the accumulated update W_t - W_0 fills.

    Also the protected dimension and the protected-triplet residual, which says whether the
    guarantee still holds however full the complement is.
    """

    def __init__(self, originals: Mapping[Site, torch.Tensor], spectra0: Mapping[Site, Spectrum],
                 projectors: Callable[[Arm], dict[Site, ReviveProjector]]) -> None:
        self.originals = originals
        self.spectra0 = spectra0
        self.projectors = projectors

    def __call__(self, arm: Arm, round: int, model: LoadedModel) -> RoundRecord:
        record = RoundRecord()
        projectors = self.projectors(arm)
        for site, s0 in self.spectra0.items():
            Wt = model.adapter.read(site).float().cpu()
            projector = projectors.get(site)
            context = {"arm": arm.name, "tau": arm.tau, "round": round, "site": str(site)}
            # Round-off of the float weights the update is read from sits near eps ||W_t||_F; 4 eps keeps it out of the rank.
            floor = 4 * torch.finfo(model.dtype).eps * float(torch.linalg.matrix_norm(Wt.double()))
            usage = complement_usage(Wt.double() - self.originals[site].double(), projector, floor=floor)
            record.rows += [{**context, "metric": name, "value": usage[key]} for key, name in USAGE_METRICS.items()]
            record.rows.append({**context, "metric": "protected_dim", "value": float(projector.k if projector else 0)})
            if projector is not None:
                record.rows.append({**context, "metric": "protected_triplet_residual",
                                    "value": triplet_residual(s0, Wt, projector.indices)})
        return record


class CapacityObservers:
    """``spectra capacity``: round and cumulative efficacy, complement usage; an arm ends when its round fails."""

    command = "capacity"

    def __init__(self, config: CapacityConfig) -> None:
        self.config = config

    def observers(self, setup: EditSetup) -> list[Observer]:
        config = self.config
        return [
            RoundEfficacy(setup.records, config.batch_size, config.seed),
            EditMetrics(setup.records, config.batch_size, config.eval_records, config.seed, config.log_samples),
            ComplementUsage(setup.originals, {site: setup.spectra0[site] for site in setup.edited}, setup.projectors),
        ]

    def extra_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def finished(self, arm: Arm, round: int, record: RoundRecord) -> bool:
        """After a failing round (its own edits' efficacy below the threshold) or the budget's last one, add the arm's
        ``edits_absorbed`` and ``capacity_reached`` rows; end the arm when it failed."""
        if round == 0:
            return False
        efficacy = next(row["value"] for row in record.rows if row["metric"] == "round_efficacy")
        failed = efficacy < self.config.threshold
        if failed or round == self.config.rounds:
            context = {"arm": arm.name, "tau": arm.tau, "round": round}
            absorbed = (round - 1 if failed else round) * self.config.batch_size
            record.rows += [{**context, "metric": "edits_absorbed", "value": float(absorbed)},
                            {**context, "metric": "capacity_reached", "value": float(failed)}]
        return failed


def run_capacity(config: CapacityConfig, progress: bool = True, given: Collection[str] | None = None,
                 figures: bool = True) -> Path:
    """Run (or resume) a capacity experiment and write its run directory; returns the run's path."""
    return run_edits(config, CapacityObservers(config), progress, given, figures)


def capacity_table(rows: "pd.DataFrame") -> "pd.DataFrame":
    """Per arm: tau, protected and complement dimension (mean over sites), edits absorbed, whether it failed, and the
    last round's efficacies. An arm's last ``edits_absorbed`` row counts (extending a run adds one)."""
    import pandas as pd

    table = []
    for arm, part in rows.groupby("arm", sort=False):
        start, final = part[part["round"] == 0], part[part["round"] == part["round"].max()]
        table.append({
            "arm": arm, "tau": part["tau"].iloc[0], "protected dim": _mean(start, "protected_dim"),
            "complement dim": _mean(start, "complement_rank"), "edits absorbed": _last(part, "edits_absorbed"),
            "failed": _last(part, "capacity_reached") == 1.0, "rounds": int(part["round"].max()),
            "round efficacy %": _mean(final, "round_efficacy"), "efficacy %": _mean(final, "efficacy"),
            "remaining dim": _mean(final, "remaining_dim"),
        })
    return pd.DataFrame(table)


def _mean(rows: "pd.DataFrame", metric: str) -> float:
    """The mean value of ``metric`` in ``rows`` (over sites; NaN when absent)."""
    return float(rows.loc[rows["metric"] == metric, "value"].mean())


def _last(rows: "pd.DataFrame", metric: str) -> float:
    """The value of ``metric``'s latest row (NaN when absent)."""
    found = rows[rows["metric"] == metric].sort_values("round")
    return float(found["value"].iloc[-1]) if len(found) else float("nan")
