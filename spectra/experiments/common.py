"""What every experiment shares: the common options, loading, site choice and the general-ability probe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from spectra.data.general import load_general_tasks, subsample
from spectra.errors import SpectraError
from spectra.evaluation.general import GeneralAbility, HeldoutText
from spectra.models import LoadedModel, Site, load_model, parse_sites
from spectra.models.tiny import WORLD_FILES


@dataclass
class CommonOptions:
    """Options every command takes; they are written into each run's config.json."""

    model: str = "tiny"
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    out: Path | None = None
    allow_download: bool = False


@dataclass
class GeneralOptions:
    """Which general-ability tasks to measure, and on how many items each."""

    tasks: list[str] = field(default_factory=list)
    items_per_task: int = 100
    compat: str = "spectra"
    data_dir: Path | None = None
    #: held-out text (one text per line) whose NLL measures general language ability; the tiny world ships one
    nll_text: Path | None = None


def open_model(options: CommonOptions) -> LoadedModel:
    """Load the model of ``options`` and seed torch for what follows (generators are still passed explicitly)."""
    torch.manual_seed(options.seed)
    return load_model(options.model, device=options.device, dtype=options.dtype, allow_download=options.allow_download)


def choose_sites(model: LoadedModel, spec: str | None, default_kinds: tuple[str, ...] = ("mlp.down",)) -> list[Site]:
    """Parse ``--sites`` (``mlp.down``, ``mlp.up@2,attn.o@3``...); by default every layer's ``default_kinds``."""
    adapter = model.adapter
    text = spec if spec else ",".join(k for k in default_kinds if k in adapter.kinds)
    return parse_sites(text, adapter.n_layers, adapter.kinds)


def world_dir(model: LoadedModel) -> Path | None:
    """The directory of a tiny-world model's world files (the embedded one, or one retrained elsewhere), else None."""
    directory = Path(model.source)
    return directory if (directory / WORLD_FILES["general"]).is_file() else None


def default_dataset(model: LoadedModel) -> str:
    """The edit set a command uses when ``--dataset auto``: the model's own world, else CounterFact."""
    directory = world_dir(model)
    return str(directory / WORLD_FILES["counterfact"]) if directory is not None else "counterfact"


def general_ability(model: LoadedModel, options: GeneralOptions, seed: int) -> GeneralAbility:
    """The general-ability probe: the tiny world's held-out tasks, or GLUE-style tasks for a real model.

    Items are subsampled once (seeded) so that every measurement of a run uses the same items.
    """
    directory = world_dir(model)
    if directory is not None:
        ability = GeneralAbility.from_file(directory / WORLD_FILES["general"])
        chosen = options.tasks or list(ability.items)
        unknown = sorted(set(chosen) - set(ability.items))
        if unknown:
            raise SpectraError(
                f"Unknown task(s) {', '.join(unknown)} for the tiny model; its tasks are {', '.join(ability.items)}."
            )
        items = {name: subsample(ability.items[name], options.items_per_task, seed) for name in chosen}
        return GeneralAbility(items)
    tasks = options.tasks or ["sst2", "mrpc", "cola", "rte"]
    items = load_general_tasks(tasks, directory=options.data_dir, compat=options.compat,
                               n_items=options.items_per_task, seed=seed)
    return GeneralAbility(items)


def heldout_text(model: LoadedModel, options: GeneralOptions) -> HeldoutText | None:
    """The held-out text whose NLL is measured: ``options.nll_text``, else the tiny world's, else none."""
    if options.nll_text is not None:
        return HeldoutText.from_file(options.nll_text)
    directory = world_dir(model)
    if directory is not None and (directory / WORLD_FILES["heldout_text"]).is_file():
        return HeldoutText.from_file(directory / WORLD_FILES["heldout_text"])
    return None


def ability_rows(scores: dict[str, dict[str, float]], **context: object) -> list[dict]:
    """Tidy rows (``task, metric, value`` plus context) from a GeneralAbility result; adds the task mean."""
    rows = [{**context, "task": task, "metric": metric, "value": value}
            for task, metrics in scores.items() for metric, value in metrics.items() if metric != "n"]
    if scores:
        mean = sum(m["accuracy"] for m in scores.values()) / len(scores)
        rows.append({**context, "task": "mean", "metric": "accuracy", "value": mean})
    return rows


def check_fraction_list(values: list[float], name: str, low: float, high: float) -> None:
    """Every value inside (low, high]; a clear error before any work otherwise."""
    for value in values:
        if not low < value <= high:
            raise SpectraError(f"{name} must lie in ({low}, {high}]; got {value}. Fix the option and run again.")
