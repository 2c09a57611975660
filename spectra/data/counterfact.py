"""CounterFact / MultiCounterFact files: reading, per-record validation, and their auxiliary files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from spectra.errors import SpectraError

#: Where the original files are published (for messages only: spectra never downloads them).
COUNTERFACT_HOST = "https://rome.baulab.info/data/dsets/ (counterfact.json) or https://memit.baulab.info/data/dsets/"


def read_json(path: Path, hint: str) -> Any:
    """Parse a JSON file; a missing or truncated file is a SpectraError that ends with ``hint``.

    Shared by every loader in ``spectra.data`` so that all of them fail the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise SpectraError(f"The data file {path} does not exist. {hint}")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpectraError(
            f"The data file {path} is not valid JSON ({err}); it is probably truncated or not the file "
            f"it is named after. Replace it with a complete copy. {hint}"
        ) from err


def malformed(path: Path, index: int, field: str, problem: str) -> SpectraError:
    """The one error shape for a bad record: file, record index, field, what is wrong."""
    return SpectraError(
        f"{path}: record {index} is malformed: field '{field}' {problem}. Fix or remove that record, "
        "or replace the file with an unmodified copy."
    )


def require(
    record: Any, key: str, kind: type | tuple[type, ...], path: Path, index: int, parent: str = ""
) -> Any:
    """``record[key]`` checked to exist and to have type ``kind`` (bools are not ints; strings not empty)."""
    name = f"{parent}.{key}" if parent else key
    if not isinstance(record, Mapping):
        raise malformed(path, index, parent or "<record>", f"should be an object but is {type(record).__name__}")
    if key not in record:
        raise malformed(path, index, name, "is missing")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise malformed(path, index, name, f"should be {expected} but is {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise malformed(path, index, name, "is empty")
    return value


def require_strings(record: Mapping, key: str, path: Path, index: int, optional: bool = False) -> list[str]:
    """A list of non-empty strings under ``key`` (an absent optional key reads as an empty list)."""
    if optional and key not in record:
        return []
    values = require(record, key, list, path, index)
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise malformed(path, index, f"{key}[{i}]", f"should be a non-empty string but is {value!r}")
    return values


def records_list(data: Any, path: Path) -> list:
    """The top-level list of a dataset file, or a SpectraError saying it is not one."""
    if not isinstance(data, list):
        raise SpectraError(
            f"{path} should hold a JSON list of records but holds a {type(data).__name__}. Check that the "
            "file is the dataset it is named after."
        )
    return data


def validate_counterfact_record(record: Any, path: Path, index: int) -> dict:
    """Check one CounterFact-schema record (section 1.2 of the evaluation reference) and return it."""
    require(record, "case_id", int, path, index)
    rewrite = require(record, "requested_rewrite", dict, path, index)
    prompt = require(rewrite, "prompt", str, path, index, "requested_rewrite")
    if prompt.count("{}") != 1:
        raise malformed(path, index, "requested_rewrite.prompt", "should contain exactly one '{}' for the subject")
    require(rewrite, "subject", str, path, index, "requested_rewrite")
    for target in ("target_new", "target_true"):
        value = require(rewrite, target, dict, path, index, "requested_rewrite")
        require(value, "str", str, path, index, f"requested_rewrite.{target}")
        if "id" in value:
            require(value, "id", str, path, index, f"requested_rewrite.{target}")
    if "relation_id" in rewrite:
        require(rewrite, "relation_id", str, path, index, "requested_rewrite")
    require_strings(record, "paraphrase_prompts", path, index)
    require_strings(record, "neighborhood_prompts", path, index)
    require_strings(record, "generation_prompts", path, index, optional=True)
    require_strings(record, "attribute_prompts", path, index, optional=True)
    return record


def validate_counterfact(data: Any, path: Path, limit: int | None = None) -> list[dict]:
    """Validate parsed CounterFact-schema data read from ``path``: every record, and unique case ids.

    ``limit`` keeps the first N records, as the reference protocol's ``dataset_size_limit`` does.
    """
    records = records_list(data, path)
    if limit is not None:
        records = records[:limit]
    seen: dict[int, int] = {}
    for index, record in enumerate(records):
        validate_counterfact_record(record, path, index)
        case_id = record["case_id"]
        if case_id in seen:
            raise malformed(path, index, "case_id", f"repeats the case_id {case_id} of record {seen[case_id]}")
        seen[case_id] = index
    return records


def load_counterfact(path: Path, limit: int | None = None) -> list[dict]:
    """Read and validate a CounterFact-schema file (``counterfact.json``, ``multi_counterfact.json``)."""
    hint = (
        f"Put counterfact.json or multi_counterfact.json (from {COUNTERFACT_HOST}) into the spectra data "
        "directory ($SPECTRA_DATA or ~/.cache/spectra/data) or pass its path; `spectra data` lists what is found."
    )
    return validate_counterfact(read_json(Path(path), hint), Path(path), limit)


def load_attribute_snippets(path: Path) -> dict[tuple[str, str], list[str]]:
    """Consistency reference texts from ``attribute_snippets.json``: (relation_id, target_id) -> texts."""
    path = Path(path)
    hint = f"Put attribute_snippets.json (from {COUNTERFACT_HOST}) next to the CounterFact file or pass its path."
    references: dict[tuple[str, str], list[str]] = {}
    for index, entry in enumerate(records_list(read_json(path, hint), path)):
        relation = require(entry, "relation_id", str, path, index)
        target = require(entry, "target_id", str, path, index)
        samples = require(entry, "samples", list, path, index)
        texts = [require(s, "text", str, path, index, f"samples[{i}]") for i, s in enumerate(samples)]
        references.setdefault((relation, target), []).extend(texts)
    return references


def load_tfidf_stats(idf_path: Path, vocab_path: Path) -> tuple[dict[str, int], np.ndarray]:
    """The fixed TF-IDF vocabulary and IDF weights (``tfidf_vocab.json``, ``idf.npy``) for Consistency."""
    hint = f"Put idf.npy and tfidf_vocab.json (from {COUNTERFACT_HOST}) next to the CounterFact file."
    vocab = read_json(Path(vocab_path), hint)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise SpectraError(f"{vocab_path} should map terms to column indices (a JSON object of ints). {hint}")
    if not Path(idf_path).is_file():
        raise SpectraError(f"The data file {idf_path} does not exist. {hint}")
    try:
        idf = np.load(idf_path, allow_pickle=False)
    except ValueError as err:
        raise SpectraError(f"{idf_path} is not a readable .npy array ({err}). {hint}") from err
    if idf.ndim != 1 or len(idf) != len(vocab):
        raise SpectraError(
            f"{idf_path} holds {idf.shape} IDF weights but {vocab_path} has {len(vocab)} terms; the two files "
            f"must come from the same fit. {hint}"
        )
    return vocab, idf


def load_known_facts(path: Path) -> list[tuple[str, str]]:
    """Factual prompts for representation probes from a ``known_1000.json``-style file: (template, subject)."""
    path = Path(path)
    hint = "Put known_1000.json (from https://rome.baulab.info/data/dsets/) into the data directory or pass its path."
    facts = []
    for index, record in enumerate(records_list(read_json(path, hint), path)):
        template = require(record, "template", str, path, index)
        if template.count("{}") != 1:
            raise malformed(path, index, "template", "should contain exactly one '{}' for the subject")
        facts.append((template, require(record, "subject", str, path, index)))
    return facts
