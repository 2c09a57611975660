"""zsRE (MEND split) files, validated and converted to CounterFact-shaped records (MENDQADataset semantics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from spectra.data.counterfact import malformed, read_json, records_list, require, require_strings
from spectra.errors import SpectraError

ZsreTarget = Literal["gold", "alt"]

#: The marker every ``loc`` question of the MEND split carries (the reference loader asserts it).
LOC_MARKER = "nq question: "


def validate_zsre_record(record: Any, path: Path, index: int, target: ZsreTarget = "gold") -> dict:
    """Check one raw zsRE record (``subject, src, rephrase, answers, alt, loc, loc_ans``) and return it."""
    subject = require(record, "subject", str, path, index)
    src = require(record, "src", str, path, index)
    if subject not in src:
        raise malformed(path, index, "src", f"does not contain the subject {subject!r}")
    require(record, "rephrase", str, path, index)
    answers = require_strings(record, "answers", path, index)
    if not answers:
        raise malformed(path, index, "answers", "is an empty list (the first answer is the edit target)")
    if target == "alt":
        require(record, "alt", str, path, index)
    loc = require(record, "loc", str, path, index)
    if LOC_MARKER not in loc:
        raise malformed(path, index, "loc", f"does not contain {LOC_MARKER!r}")
    require(record, "loc_ans", str, path, index)
    return record


def zsre_to_counterfact(record: dict, case_id: int, target: ZsreTarget = "gold") -> dict:
    """Convert a validated raw zsRE record to the CounterFact shape that editors and scorers share.

    ``target="gold"`` writes ``answers[0]`` (the reference protocol REVIVE reports); ``"alt"`` writes the
    counterfactual ``alt`` (EasyEdit's choice) and keeps the gold answer as ``target_true``. Neighbourhood
    prompts stay whole ``{prompt, target}`` pairs; the scorer teacher-forces their tokens itself. EasyEdit's
    ``portability`` (``New Question``, ``New Answer``) becomes a portability prompt.
    """
    gold = record["answers"][0]
    new, true = (gold, None) if target == "gold" else (record["alt"], {"str": gold})
    portability = record.get("portability")
    question, answer = (portability.get("New Question"), portability.get("New Answer")) if isinstance(portability, dict) \
        else (None, None)
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": record["src"].replace(record["subject"], "{}", 1),
            "subject": record["subject"],
            "target_new": {"str": new},
            "target_true": true,
        },
        "paraphrase_prompts": [record["rephrase"]],
        "neighborhood_prompts": [{"prompt": record["loc"] + "?", "target": record["loc_ans"]}],
        "portability_prompts": [{"prompt": question, "target": answer}]
        if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip() else [],
    }


def convert_zsre(data: Any, path: Path, target: ZsreTarget = "gold", limit: int | None = None) -> list[dict]:
    """Validate parsed raw zsRE data read from ``path`` and convert it to CounterFact-shaped records.

    ``case_id`` is the record's index in the file. With ``target="alt"``, records whose ``alt`` is empty
    are skipped (as EasyEdit does); with the default they are kept, since ``alt`` is not used.
    """
    if target not in ("gold", "alt"):
        raise SpectraError(f"Unknown zsRE target {target!r}: use 'gold' (answers[0], the reference) or 'alt'.")
    raw = records_list(data, path)
    if limit is not None:
        raw = raw[:limit]
    converted = []
    for index, record in enumerate(raw):
        if target == "alt" and isinstance(record, dict) and record.get("alt") == "":
            continue
        validate_zsre_record(record, path, index, target)
        converted.append(zsre_to_counterfact(record, index, target))
    return converted


def load_zsre(path: Path, target: ZsreTarget = "gold", limit: int | None = None) -> list[dict]:
    """Read a raw zsRE file (``zsre_mend_eval.json`` or the tiny world's ``zsre.json``); see ``convert_zsre``."""
    hint = (
        "Put zsre_mend_eval.json (from https://rome.baulab.info/data/dsets/) into the spectra data directory "
        "($SPECTRA_DATA or ~/.cache/spectra/data) or pass its path; `spectra data` lists what is found."
    )
    return convert_zsre(read_json(Path(path), hint), Path(path), target, limit)
