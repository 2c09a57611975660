"""What every experiment shares: the common options, loading, site choice, record checks and the general-ability probe."""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from spectra.data.general import load_general_tasks, subsample
from spectra.data.records import MultipleChoiceItem
from spectra.errors import SpectraError
from spectra.evaluation.general import GeneralAbility, HeldoutText
from spectra.glossary import with_units
from spectra.models import LoadedModel, Site, load_model, parse_sites
from spectra.editing.hparams import KNOWN_MODELS
from spectra.models.loading import ALIASES, resolve_source
from spectra.models.tiny import WORLD_FILES
from spectra.models.tokens import continuation_ids, encode

T = TypeVar("T")

#: How many offending records an error about a dataset lists.
LISTED_RECORDS = 5


@dataclass
class CommonOptions:
    """Options every command takes; they are written into each run's config.json."""

    model: str = "tiny"
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    out: Path | None = None
    allow_download: bool = False
    #: spread the model over every device through accelerate ("auto"); None: all of it on ``device``
    device_map: str | None = None


@dataclass
class GeneralOptions:
    """Which general-ability tasks to measure, and on how many items each."""

    tasks: list[str] = field(default_factory=list)
    items_per_task: int = 100
    compat: str = "spectra"
    data_dir: Path | None = None
    #: held-out text (one text per line) whose NLL measures general language ability; the tiny world ships one
    nll_text: Path | None = None

    def validate(self) -> None:
        """Counts checked before any work (the upper bound, each task's size, when the items are read)."""
        if self.items_per_task < 1:
            raise SpectraError(f"--items-per-task must be at least 1 (got {self.items_per_task}); every general-ability "
                               "task is scored on that many items.")


def config_from_json(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuild an options dataclass from its config.json form: nested options and paths restored, unknown keys refused."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpectraError(
            f"The run's config.json has options this version of spectra does not know ({', '.join(unknown)}). Continue "
            "it with the spectra version that wrote it (its provenance records the version), or start a new run."
        )
    hints = typing.get_type_hints(cls)
    return cls(**{name: _from_json(hints[name], value) for name, value in data.items()})


def _from_json(hint: Any, value: Any) -> Any:
    """One option's value from JSON data, by its annotation (a dataclass, a Path, or as it is)."""
    if value is None:
        return None
    candidates = typing.get_args(hint) or (hint,)
    for candidate in candidates:
        if is_dataclass(candidate) and isinstance(value, Mapping):
            return config_from_json(candidate, value)
        if candidate is Path and isinstance(value, str):
            return Path(value)
    return value


def open_model(options: CommonOptions, tokenizer: object | None = None) -> LoadedModel:
    """Load the model of ``options`` (with ``tokenizer`` when already loaded) and seed torch for what follows."""
    torch.manual_seed(options.seed)
    return load_model(options.model, device=options.device, dtype=options.dtype, allow_download=options.allow_download,
                      tokenizer=tokenizer, device_map=options.device_map)


def choose_sites(model: LoadedModel, spec: str | None, default_kinds: tuple[str, ...] = ("mlp.down",)) -> list[Site]:
    """Parse ``--sites`` (``mlp.down``, ``mlp.up@2,attn.o@3``...); by default every layer's ``default_kinds``."""
    adapter = model.adapter
    text = spec if spec else ",".join(k for k in default_kinds if k in adapter.kinds)
    return parse_sites(text, adapter.n_layers, adapter.kinds)


def world_dir(model: LoadedModel | str) -> Path | None:
    """The world files' directory of a tiny-world model (the embedded one, or one retrained elsewhere), else None.

    Takes the loaded model or its name (alias, path or hub id), so that everything read from the
    world can be read and checked before the model loads.
    """
    source = model.source if isinstance(model, LoadedModel) else resolve_source(model)
    directory = Path(source)
    return directory if (directory / WORLD_FILES["general"]).is_file() else None


def defaults_key(model: str) -> str | None:
    """The per-model editor defaults a model gets: ``tiny`` for a tiny-world model, a known alias's for that alias or
    the hub id it resolves to (``meta-llama/Meta-Llama-3-8B-Instruct`` gets ``llama3``'s), else None."""
    if world_dir(model) is not None:
        return "tiny"
    source = resolve_source(model)
    return next((alias for alias in KNOWN_MODELS if alias in ALIASES and resolve_source(alias) == source), None)


def default_dataset(model: LoadedModel | str) -> str:
    """The edit set a command uses when ``--dataset auto``: the model's own world, else CounterFact."""
    directory = world_dir(model)
    return str(directory / WORLD_FILES["counterfact"]) if directory is not None else "counterfact"


def general_ability(model: LoadedModel | str, options: GeneralOptions, seed: int) -> GeneralAbility:
    """The general-ability probe: the tiny world's held-out tasks, or GLUE-style tasks for a real model.

    Items are subsampled once (seeded) so that every measurement of a run uses the same items; a
    task with fewer items than asked for is an error, never a silent cap.
    """
    options.validate()
    return GeneralAbility(general_items(model, options, seed, options.items_per_task))


def general_items(model: LoadedModel | str, options: GeneralOptions, seed: int,
                  n_items: int | None) -> dict[str, list[MultipleChoiceItem]]:
    """Each chosen task's items: ``n_items`` of them (seeded, class-balanced), or all in that seeded order with None."""
    directory = world_dir(model)
    if directory is not None:
        ability = GeneralAbility.from_file(directory / WORLD_FILES["general"])
        chosen = options.tasks or list(ability.items)
        unknown = sorted(set(chosen) - set(ability.items))
        if unknown:
            raise SpectraError(
                f"Unknown task(s) {', '.join(unknown)} for the tiny model; its tasks are {', '.join(ability.items)}."
            )
        return {name: subsample(ability.items[name], n_items, seed) for name in chosen}
    tasks = options.tasks or ["sst2", "mrpc", "cola", "rte"]
    return load_general_tasks(tasks, directory=options.data_dir, compat=options.compat, n_items=n_items, seed=seed)


def spare_general_items(model: LoadedModel | str, options: GeneralOptions, seed: int,
                        per_task: int) -> list[MultipleChoiceItem]:
    """Up to ``per_task`` items of each task that the general-ability probe never scores (a set held out from it).

    What the ``fisher`` protection criterion computes its loss gradients on, so that choosing the
    protected directions never sees the items that later judge them.
    """
    scored = general_items(model, options, seed, options.items_per_task)
    spare = []
    for name, items in general_items(model, options, seed, None).items():
        used = set(scored[name])
        spare += [item for item in items if item not in used][:per_task]
    if not spare:
        raise SpectraError(
            f"Every general-task item is scored by the probe ({options.items_per_task} per task), so none is left to "
            "compute the fisher criterion's gradients on. Lower --items-per-task, or use another criterion."
        )
    return spare


def heldout_text(model: LoadedModel | str, options: GeneralOptions) -> HeldoutText | None:
    """The held-out text whose NLL is measured: ``options.nll_text``, else the tiny world's, else none."""
    if options.nll_text is not None:
        return HeldoutText.from_file(options.nll_text)
    directory = world_dir(model)
    if directory is not None and (directory / WORLD_FILES["heldout_text"]).is_file():
        return HeldoutText.from_file(directory / WORLD_FILES["heldout_text"])
    return None


def record_problems(record: Mapping[str, Any], tokenizer: object) -> list[str]:
    """Why the model cannot be edited or scored on a CounterFact-shaped record (empty when it can).

    The subject must be a whole run of tokens in the filled prompt (editors key on its last
    token), neither it nor a target may contain the tokenizer's unknown token, and the new target
    must differ from the true one.
    """
    rewrite = record["requested_rewrite"]
    prompt, subject = rewrite["prompt"], rewrite["subject"]
    new, true = rewrite["target_new"]["str"], (rewrite.get("target_true") or {}).get("str")
    problems = []
    if true is not None and new.strip() == true.strip():
        problems.append(f"target_new equals target_true ({new!r}), so there is nothing to edit")
    filled = prompt.format(subject)
    before = encode(tokenizer, prompt[: prompt.index("{}")])
    through = encode(tokenizer, prompt[: prompt.index("{}")] + subject)
    if len(through) <= len(before) or encode(tokenizer, filled)[: len(through)] != through:
        problems.append(f"the subject {subject!r} is not a whole run of tokens in the prompt {filled!r}")
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is not None:
        if unknown in through[len(before):]:
            problems.append(f"the subject {subject!r} holds words the tokenizer does not know")
        for name, target in (("target_new", new), ("target_true", true)):
            if target is not None and unknown in continuation_ids(tokenizer, filled, target)[1]:
                problems.append(f"{name} {target!r} holds words the tokenizer does not know")
    return problems


def usable_records(records: Sequence[dict], tokenizer: object, dataset: str, skip: bool) -> tuple[list[dict], list[int]]:
    """The records the model can be edited and scored on, and the case ids left out (only with ``skip``).

    Without ``skip`` any bad record is an error that lists the first few; with it they are left out
    and the caller reports how many.
    """
    kept, skipped, listed = [], [], []
    for record in records:
        problems = record_problems(record, tokenizer)
        if not problems:
            kept.append(record)
            continue
        skipped.append(int(record["case_id"]))
        if len(listed) < LISTED_RECORDS:
            listed.append(f"case_id {record['case_id']}: {'; '.join(problems)}")
    if skipped and not skip:
        more = f", and {len(skipped) - len(listed)} more" if len(skipped) > len(listed) else ""
        raise SpectraError(
            f"{len(skipped)} of the {len(records)} records used from {dataset} cannot be edited or scored with this "
            f"model's tokenizer ({' | '.join(listed)}{more}). Fix or remove those records, or pass --skip-bad-records "
            "to leave them out (the run then says how many it skipped)."
        )
    return kept, skipped


def ability_rows(scores: dict[str, dict[str, float]], **context: object) -> list[dict]:
    """Tidy rows (``task, metric, value, unit`` plus context) from a GeneralAbility result; adds the task mean."""
    rows = [{**context, "task": task, "metric": metric, "value": value}
            for task, metrics in scores.items() for metric, value in metrics.items() if metric != "n"]
    if scores:
        mean = sum(m["accuracy"] for m in scores.values()) / len(scores)
        rows.append({**context, "task": "mean", "metric": "accuracy", "value": mean})
    return with_units(rows)


def general_rows(ability: GeneralAbility, text: HeldoutText | None, model: LoadedModel, **context: object) -> list[dict]:
    """The model's general ability now as tidy rows: task accuracies (``ability_rows``) and, when there is held-out
    text, its NLL and perplexity (task ``heldout_text``)."""
    rows = ability_rows(ability(model.model, model.tokenizer), **context)
    if text is not None:
        measured = text(model.model, model.tokenizer)
        rows += with_units({**context, "task": "heldout_text", "metric": f"text_{name}", "value": measured[name]}
                           for name in ("nll", "perplexity"))
    return rows


def check_fraction_list(values: list[float], name: str, low: float, high: float) -> None:
    """Every value inside (low, high]; a clear error before any work otherwise."""
    for value in values:
        if not low < value <= high:
            raise SpectraError(f"{name} must lie in ({low}, {high}]; got {value}. Fix the option and run again.")
