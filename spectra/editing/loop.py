"""The sequential edit loop: rounds of batches, editor -> filter -> write -> observers; REVIVE on/off as arms.

Every arm runs over the same requests in the same order, starting from the same original weights
(restored between arms) with a freshly built editor, so REVIVE on and off differ only by the
filter. After every round the loop calls the observers and hands their rows, plus everything
needed to resume the arm (the edited weights and the editor's state), to ``on_round`` for
checkpointing; ``run`` continues each arm from such a state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch

from spectra.data.records import EditRequest
from spectra.editing.base import Editor
from spectra.editing.filters import SiteFilter
from spectra.errors import SpectraError
from spectra.models.loading import LoadedModel
from spectra.models.sites import Site
from spectra.progress import NoStages, Stages


@dataclass(frozen=True)
class Arm:
    """One arm of a comparison: REVIVE off (``tau`` None) or on with threshold ``tau``."""

    name: str
    tau: float | None = None


@dataclass
class RoundRecord:
    """What observers measured after one round: tidy rows, named tensors (e.g. SS matrices), per-prompt samples."""

    rows: list[dict] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


class Observer(Protocol):
    """Measures the model after a round (round 0 = before any edit) and returns rows/tensors."""

    def __call__(self, arm: Arm, round: int, model: LoadedModel) -> RoundRecord: ...


@dataclass(frozen=True)
class ArmState:
    """Where one arm of an interrupted (or finished) run stands: its last finished round, the edited weights, the editor's state."""

    round: int
    weights: dict[Site, torch.Tensor]
    editor_state: dict[str, torch.Tensor]


#: Called after every round (0 = before editing) with the arm, its index, the round, what the observers
#: measured, and the arm's state as flat named tensors (``arm_state_tensors``) for checkpointing.
RoundCallback = Callable[[Arm, int, int, RoundRecord, dict[str, torch.Tensor]], None]


def arm_state_tensors(weights: dict[Site, torch.Tensor], editor_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An arm's state as one flat dict of tensors: ``weight.<site>`` and ``editor.<name>``."""
    flat = {f"weight.{site}": weight for site, weight in weights.items()}
    flat.update({f"editor.{name}": tensor for name, tensor in editor_state.items()})
    return flat


def arm_state(round: int, tensors: dict[str, torch.Tensor], sites: Sequence[Site]) -> ArmState:
    """Rebuild an ArmState from the flat tensors ``arm_state_tensors`` wrote; a checkpoint lacking a site is an error."""
    missing = [str(s) for s in sites if f"weight.{s}" not in tensors]
    if missing:
        raise SpectraError(
            f"The checkpoint lacks the weights of {', '.join(missing)}; it cannot be resumed. Start the run afresh."
        )
    editor = {name.removeprefix("editor."): t for name, t in tensors.items() if name.startswith("editor.")}
    return ArmState(round, {s: tensors[f"weight.{s}"] for s in sites}, editor)


class EditLoop:
    """Runs ``rounds`` rounds of ``batch_size`` requests per arm; see the module docstring."""

    def __init__(
        self,
        model: LoadedModel,
        requests: Sequence[EditRequest],
        rounds: int,
        batch_size: int,
        make_editor: Callable[[], Editor],
        make_filter: Callable[[Arm], SiteFilter],
        observers: Sequence[Observer],
        stages: Stages | None = None,
    ) -> None:
        if rounds < 1 or batch_size < 1:
            raise SpectraError(f"rounds and batch size must be at least 1 (got {rounds} and {batch_size}).")
        needed = rounds * batch_size
        if len(requests) < needed:
            raise SpectraError(
                f"{rounds} rounds of {batch_size} edits need {needed} edit records, but the dataset has "
                f"{len(requests)}. Use fewer --rounds or a smaller --batch-size, or a larger dataset."
            )
        self.model = model
        self.requests = list(requests[:needed])
        self.rounds = rounds
        self.batch_size = batch_size
        self.make_editor = make_editor
        self.make_filter = make_filter
        self.observers = list(observers)
        self.stages = stages or NoStages()
        probe = make_editor()
        self.sites = probe.edited_sites(model)
        self.original = {site: model.adapter.read(site).clone() for site in self.sites}

    def batch(self, round: int) -> list[EditRequest]:
        """The requests of round ``round`` (1-based)."""
        start = (round - 1) * self.batch_size
        return self.requests[start : start + self.batch_size]

    def restore(self) -> None:
        """Write the original weights back into every edited site (bit for bit)."""
        for site, weight in self.original.items():
            self.model.adapter.write(site, weight)

    def observe(self, arm: Arm, round: int) -> RoundRecord:
        """Call every observer and merge their records."""
        merged = RoundRecord()
        with self.stages.stage(f"{arm.name} round {round}: observers", len(self.observers)) as advance:
            for observer in self.observers:
                record = observer(arm, round, self.model)
                merged.rows.extend(record.rows)
                merged.tensors.update(record.tensors)
                merged.samples.extend(record.samples)
                advance(1)
        return merged

    def run(self, arms: Sequence[Arm], on_round: RoundCallback, resume: Mapping[str, ArmState] | None = None,
            finished: Callable[[Arm], bool] | None = None) -> None:
        """Run every arm, each from its own state in ``resume`` (by arm name) when it has one; restores the original weights at the end.

        An arm whose state is at the last round is skipped; one with an earlier state continues
        after it (that is also how a finished run is extended with more rounds); the others start
        from the original weights with round 0. ``finished(arm)``, asked before an arm starts and
        after each of its rounds' ``on_round``, ends an arm early (capacity: its edits stopped working).
        """
        done = finished or (lambda arm: False)
        for arm_index, arm in enumerate(arms):
            state = (resume or {}).get(arm.name)
            if (state is not None and state.round >= self.rounds) or done(arm):
                continue
            self._run_arm(arm_index, arm, on_round, state, done)
        self.restore()

    def _run_arm(self, arm_index: int, arm: Arm, on_round: RoundCallback, resume: ArmState | None,
                 finished: Callable[[Arm], bool]) -> None:
        editor = self.make_editor()
        if resume is None:
            self.restore()
            editor.prepare(self.model, self.requests)
            start = 0
        else:
            for site, weight in resume.weights.items():
                self.model.adapter.write(site, weight)
            editor.load_state_dict(resume.editor_state)
            start = resume.round
        site_filter = self.make_filter(arm)
        if resume is None:
            began = time.perf_counter()
            record = self.observe(arm, 0)
            record.rows.append(_timing(arm, 0, "seconds_observe", time.perf_counter() - began))
            on_round(arm, arm_index, 0, record, self._state(editor))
        for round in range(start + 1, self.rounds + 1):
            began = time.perf_counter()
            with self.stages.stage(f"{arm.name} round {round}: z optimisation", editor.z_steps) as advance:
                editor.on_step = advance
                editor.apply_round(self.model, self.batch(round), site_filter)
            if round == self.rounds and hasattr(editor, "finalize"):
                editor.finalize(self.model)
            edit_seconds = time.perf_counter() - began
            began = time.perf_counter()
            record = self.observe(arm, round)
            record.rows.append(_timing(arm, round, "seconds_edit", edit_seconds))
            record.rows.append(_timing(arm, round, "seconds_observe", time.perf_counter() - began))
            on_round(arm, arm_index, round, record, self._state(editor))
            if finished(arm):
                return

    def _state(self, editor: Editor) -> dict[str, torch.Tensor]:
        """What resuming the arm needs: the edited sites' weights and the editor's cross-round state."""
        weights = {site: self.model.adapter.read(site).clone() for site in self.sites}
        return arm_state_tensors(weights, editor.state_dict())


def _timing(arm: Arm, round: int, metric: str, seconds: float) -> dict:
    return {"arm": arm.name, "tau": arm.tau, "round": round, "metric": metric, "value": seconds}
