"""General-ability tasks (GLUE, MNLI, MMLU, tiny world) as multiple-choice items, from local files only."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from spectra.data.counterfact import malformed, read_json, records_list, require
from spectra.data.records import MultipleChoiceItem
from spectra.errors import SpectraError

Compat = Literal["spectra", "alphaedit"]


def _label(row: Mapping, path: Path, index: int, names: Mapping[str, int]) -> int:
    """A row's integer label; string labels ("1", "entailment", "B") are mapped through ``names``."""
    value = row.get("label", row.get("answer")) if isinstance(row, Mapping) else None
    if isinstance(value, bool):
        value = None
    if isinstance(value, str):
        value = names.get(value.strip(), int(value) if value.strip().lstrip("-").isdigit() else None)
    if not isinstance(value, int) or value not in names.values():
        field = "answer" if isinstance(row, Mapping) and "answer" in row else "label"
        allowed = sorted(set(names.values()))
        raise malformed(path, index, field, f"should be one of {allowed} (or {sorted(names)}) but is {value!r}")
    return value


@dataclass(frozen=True)
class ClassificationTask:
    """One zero-shot task: how a data row becomes a prompt, its label words, and which word is gold.

    ``gold(label, compat)`` maps the dataset's integer label to the index of the correct choice;
    ``compat="alphaedit"`` reproduces the reference harness where it differs (RTE's inverted labels).
    ``row_choices`` > 0 means each row carries that many answer texts under ``choices`` (MMLU).
    """

    name: str
    fields: tuple[str, ...]
    prompt: Callable[[Mapping[str, Any]], str]
    choices: tuple[str, ...]
    labels: Mapping[str, int]
    gold: Callable[[int, Compat], int]
    hf_path: str
    hf_config: str
    hf_split: str
    row_choices: int = 0

    def item(self, row: Mapping[str, Any], path: Path, index: int, compat: Compat = "spectra") -> MultipleChoiceItem:
        """Validate one data row and turn it into a multiple-choice item."""
        for field in self.fields:
            require(row, field, str, path, index)
        if self.row_choices:
            choices = require(row, "choices", list, path, index)
            if len(choices) != self.row_choices or not all(isinstance(c, str) for c in choices):
                raise malformed(path, index, "choices", f"should be a list of {self.row_choices} strings")
        label = _label(row, path, index, self.labels)
        return MultipleChoiceItem(self.name, self.prompt(row), self.choices, self.gold(label, compat))


def _same(label: int, compat: Compat) -> int:
    return label


def _rte_gold(label: int, compat: Compat) -> int:
    """RTE label 0 = entailment ⇔ " True" (index 1); AlphaEdit's harness counts label 1 as True."""
    return label if compat == "alphaedit" else 1 - label


def _mmlu_prompt(row: Mapping[str, Any]) -> str:
    options = "".join(f"\n({letter}) {choice}" for letter, choice in zip("ABCD", row["choices"]))
    return f"Question: {row['question']}{options}\nAnswer:"


_BINARY = {"0": 0, "1": 1}
_ENTAILMENT = {"entailment": 0, "not_entailment": 1, "0": 0, "1": 1}

#: The task descriptions; prompts are the reference's zero-shot forms (evaluation reference §3.2).
TASKS: Mapping[str, ClassificationTask] = {
    task.name: task
    for task in (
        ClassificationTask(
            "sst2", ("sentence",), lambda r: "Review :" + r["sentence"] + "\nSentiment :",
            ("negative", "positive"), _BINARY, _same, "nyu-mll/glue", "sst2", "validation",
        ),
        ClassificationTask(
            "mrpc", ("sentence1", "sentence2"),
            lambda r: "Are the sentences paraphrases of each other.\nSentence 1: " + r["sentence1"]
            + "\nSentence 2: " + r["sentence2"] + "\nAnswer:",
            ("No", "Yes"), _BINARY, _same, "nyu-mll/glue", "mrpc", "validation",
        ),
        ClassificationTask(
            "cola", ("sentence",),
            lambda r: "Is this sentence linguistically acceptable?\nSentence: " + r["sentence"] + "\nAnswer: ",
            ("No", "Yes"), _BINARY, _same, "nyu-mll/glue", "cola", "validation",
        ),
        ClassificationTask(
            "rte", ("sentence1", "sentence2"),
            lambda r: r["sentence1"] + "\nquestion: " + r["sentence2"] + " True or False?\nanswer:",
            ("False", "True"), _ENTAILMENT, _rte_gold, "nyu-mll/glue", "rte", "validation",
        ),
        ClassificationTask(
            "nli", ("sentence1", "sentence2"),
            lambda r: r["sentence1"] + " entails the " + r["sentence2"] + " True or False? Answer:",
            ("False", "True"), _ENTAILMENT, lambda label, compat: 1 - label, "nyu-mll/glue", "rte", "train",
        ),
        ClassificationTask(
            "mnli", ("premise", "hypothesis"),
            lambda r: r["premise"] + "\nQuestion: " + r["hypothesis"] + " True, False or Neither?\nAnswer:",
            ("True", "Neither", "False"), {"entailment": 0, "neutral": 1, "contradiction": 2, "0": 0, "1": 1, "2": 2},
            _same, "nyu-mll/glue", "mnli", "validation_matched",
        ),
        ClassificationTask(
            "mmlu", ("question",), _mmlu_prompt, ("A", "B", "C", "D"),
            {"A": 0, "B": 1, "C": 2, "D": 3, "0": 0, "1": 1, "2": 2, "3": 3}, _same, "cais/mmlu", "all", "validation",
            row_choices=4,
        ),
    )
}


def task(name: str) -> ClassificationTask:
    """The task description called ``name``, or a SpectraError listing the known ones."""
    if name not in TASKS:
        raise SpectraError(f"Unknown general-ability task {name!r}. Known tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def subsample(items: Sequence[MultipleChoiceItem], n_items: int | None, seed: int = 37) -> list[MultipleChoiceItem]:
    """A class-balanced, label-interleaved subset of ``n_items`` (all items when None), reproducible by seed.

    Each gold class is shuffled with ``random.Random(seed)`` and classes are interleaved, as the reference
    harness builds its subsets, so any prefix of the result is (near) balanced. Asking for fewer than
    one item, or for more than the task has, is an error rather than a silent cap.
    """
    if n_items is not None and not 1 <= n_items <= len(items):
        name = items[0].task if items else "this"
        raise SpectraError(
            f"The {name} task has {len(items)} items, and {n_items} were asked for (--items-per-task). Ask for "
            f"between 1 and {len(items)}."
        )
    rng = random.Random(seed)
    by_gold: dict[int, list[MultipleChoiceItem]] = {}
    for item in items:
        by_gold.setdefault(item.gold, []).append(item)
    pools = [by_gold[gold] for gold in sorted(by_gold)]
    for pool in pools:
        rng.shuffle(pool)
    interleaved = [pool[i] for i in range(max((len(p) for p in pools), default=0)) for pool in pools if i < len(pool)]
    return interleaved if n_items is None else interleaved[:n_items]


def items_from_rows(
    name: str, rows: Sequence[Mapping[str, Any]], source: Path, compat: Compat = "spectra",
    n_items: int | None = None, seed: int = 37,
) -> list[MultipleChoiceItem]:
    """Turn data rows (GLUE/MMLU field names) into validated, subsampled items of task ``name``."""
    description = task(name)
    items = [description.item(row, source, index, compat) for index, row in enumerate(rows)]
    return subsample(items, n_items, seed)


def read_jsonl(path: Path, hint: str) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped); a bad line names the file and line index."""
    path = Path(path)
    if not path.is_file():
        raise SpectraError(f"The data file {path} does not exist. {hint}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SpectraError(
                    f"{path}: line {index + 1} is not valid JSON ({err}). Each line must be one JSON object. {hint}"
                ) from err
    return rows


def load_task_jsonl(
    name: str, path: Path, compat: Compat = "spectra", n_items: int | None = 100, seed: int = 37
) -> list[MultipleChoiceItem]:
    """Items of task ``name`` from a JSONL file with the GLUE/MMLU field names of that task."""
    description = task(name)
    hint = (
        f"Write one JSON object per line with the fields {', '.join(description.fields)} and 'label' "
        f"('answer' and 'choices' for MMLU), e.g. exported from {description.hf_path} ({description.hf_config}, "
        f"{description.hf_split})."
    )
    return items_from_rows(name, read_jsonl(path, hint), Path(path), compat, n_items, seed)


@contextmanager
def _offline() -> Iterator[None]:
    """Force the Hugging Face libraries offline for the duration of a load, then restore the environment."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: "1" for key in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_task_hf_cache(
    name: str, compat: Compat = "spectra", n_items: int | None = 100, seed: int = 37
) -> list[MultipleChoiceItem]:
    """Items of task ``name`` from the local Hugging Face datasets cache (never from the network)."""
    description = task(name)
    try:
        import datasets
    except ImportError as err:
        raise SpectraError(
            f"Reading the {name} task from the Hugging Face cache needs the `datasets` package, which is not "
            "installed (spectra does not depend on it). Either `pip install datasets` and download "
            f"{description.hf_path} ({description.hf_config}) once with network access, or export the split to "
            "a JSONL file and pass that file instead."
        ) from err
    source = Path(f"{description.hf_path}/{description.hf_config}/{description.hf_split}")
    with _offline():
        try:
            rows = datasets.load_dataset(description.hf_path, description.hf_config, split=description.hf_split)
        except Exception as err:  # noqa: BLE001 - datasets raises many types for "not cached"
            raise SpectraError(
                f"The {name} task ({description.hf_path}, {description.hf_config}, {description.hf_split}) is not "
                f"in the local Hugging Face datasets cache ({err}). Download it once with network access "
                f"(datasets.load_dataset({description.hf_path!r}, {description.hf_config!r})) or pass a JSONL file."
            ) from err
        return items_from_rows(name, list(rows), source, compat, n_items, seed)


def load_general_items(path: Path) -> dict[str, list[MultipleChoiceItem]]:
    """The tiny world's general-ability items: a JSON list of ``{task, prompt, choices, gold}``, by task."""
    path = Path(path)
    hint = "It is written by spectra's tiny-world generator (spectra/data/tiny_world.py); regenerate it."
    tasks: dict[str, list[MultipleChoiceItem]] = {}
    for index, record in enumerate(records_list(read_json(path, hint), path)):
        name = require(record, "task", str, path, index)
        prompt = require(record, "prompt", str, path, index)
        choices = require(record, "choices", list, path, index)
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise malformed(path, index, "choices", "should be a list of at least two non-empty strings")
        gold = require(record, "gold", int, path, index)
        if not 0 <= gold < len(choices):
            raise malformed(path, index, "gold", f"should index into the {len(choices)} choices but is {gold}")
        tasks.setdefault(name, []).append(MultipleChoiceItem(name, prompt, tuple(choices), gold))
    return tasks


def load_general_tasks(
    names: Sequence[str], directory: Path | None = None, compat: Compat = "spectra",
    n_items: int | None = 100, seed: int = 37,
) -> dict[str, list[MultipleChoiceItem]]:
    """Items for each task: from ``directory/<task>.jsonl`` when a directory is given, else the HF cache."""
    if directory is None:
        return {name: load_task_hf_cache(name, compat, n_items, seed) for name in names}
    return {name: load_task_jsonl(name, Path(directory) / f"{name}.jsonl", compat, n_items, seed) for name in names}
