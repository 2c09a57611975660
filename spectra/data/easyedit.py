"""EasyEdit and KnowEdit edit sets (``prompt, subject, target_new, ground_truth, ...``) as CounterFact-shaped records.

Two styles share the core fields and are told apart by the others:

- CounterFact-style (EasyEdit's counterfact files): ``rephrase_prompt``, ``locality_prompt`` and
  ``locality_ground_truth`` as plain strings;
- zsRE-style (KnowEdit's ZsRE, WikiData_counterfact, WikiData_recent; EasyEdit's examples):
  ``rephrase_prompt``, and ``locality`` / ``portability`` as groups of ``{prompt, ground_truth}``
  (or, in EasyEdit's in-memory form, ``{name: {prompt: [...], ground_truth: [...]}}``).

``ground_truth`` becomes target_true (a list of aliases, possibly nested, gives its first), the
rephrasings paraphrase prompts, locality prompts neighbourhood prompts with their own answers,
and portability prompts a metric of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from spectra.data.counterfact import malformed, records_list, require
from spectra.errors import SpectraError

#: The fields every EasyEdit/KnowEdit edit record has.
CORE_FIELDS = ("prompt", "subject", "target_new")


def is_easyedit(record: Any) -> bool:
    """Whether a parsed record is an EasyEdit/KnowEdit edit (its core fields, no CounterFact ``requested_rewrite``)."""
    return isinstance(record, Mapping) and set(CORE_FIELDS) <= record.keys() and "requested_rewrite" not in record


def style(record: Mapping[str, Any]) -> str:
    """``counterfact`` (flat locality_prompt strings) or ``zsre`` (grouped locality / portability) style."""
    return "counterfact" if "locality_prompt" in record else "zsre"


def first_text(value: Any) -> str | None:
    """The first string of an answer: the text itself, or the first alias of a (nested) list; None when empty."""
    while isinstance(value, list) and value:
        value = value[0]
    return value.strip() if isinstance(value, str) and value.strip() else None


def answered_prompts(value: Any, path: Path, index: int, field: str) -> list[dict[str, str]]:
    """``{prompt, target}`` pairs from a locality or portability field, in every shape EasyEdit and KnowEdit use."""
    if value is None:
        return []
    groups = value.items() if isinstance(value, Mapping) else [(field, value)]
    pairs = []
    for name, group in groups:
        entries = group if isinstance(group, list) else [group]
        for entry in entries:
            if not isinstance(entry, Mapping) or "prompt" not in entry or "ground_truth" not in entry:
                raise malformed(path, index, f"{field}.{name}", "should hold {prompt, ground_truth} entries")
            prompts = entry["prompt"] if isinstance(entry["prompt"], list) else [entry["prompt"]]
            answers = entry["ground_truth"] if isinstance(entry["prompt"], list) else [entry["ground_truth"]]
            if len(prompts) != len(answers):
                raise malformed(path, index, f"{field}.{name}", "has lists of prompts and ground truths of different "
                                "lengths")
            for prompt, answer in zip(prompts, answers):
                target = first_text(answer)
                if isinstance(prompt, str) and prompt.strip() and target is not None:
                    pairs.append({"prompt": prompt, "target": target})
    return pairs


def convert_record(record: Any, path: Path, index: int) -> dict:
    """One EasyEdit/KnowEdit record as a CounterFact-shaped record (its ``case_id`` or its index)."""
    prompt = require(record, "prompt", str, path, index)
    subject = require(record, "subject", str, path, index)
    if "{}" in prompt:
        raise malformed(path, index, "prompt", "contains '{}'; EasyEdit prompts hold the subject itself")
    if subject not in prompt:
        raise malformed(path, index, "prompt", f"does not contain the subject {subject!r}")
    new = first_text(record["target_new"])
    if new is None:
        raise malformed(path, index, "target_new", "is empty")
    true = first_text(record.get("ground_truth"))
    rephrase = record.get("rephrase_prompt", record.get("rephrase", []))
    paraphrases = [p for p in (rephrase if isinstance(rephrase, list) else [rephrase]) if isinstance(p, str) and p.strip()]
    if style(record) == "counterfact":
        locality = answered_prompts({"locality": {"prompt": record["locality_prompt"],
                                                  "ground_truth": record.get("locality_ground_truth")}},
                                    path, index, "locality_prompt")
    else:
        locality = answered_prompts(record.get("locality"), path, index, "locality")
    case_id = record.get("case_id", index)
    if isinstance(case_id, bool) or not isinstance(case_id, int):
        raise malformed(path, index, "case_id", f"should be int but is {type(case_id).__name__}")
    return {
        "case_id": case_id,
        "requested_rewrite": {"prompt": prompt.replace(subject, "{}", 1), "subject": subject,
                              "target_new": {"str": new}, "target_true": None if true is None else {"str": true}},
        "paraphrase_prompts": paraphrases,
        "neighborhood_prompts": locality,
        "portability_prompts": answered_prompts(record.get("portability"), path, index, "portability"),
    }


def convert_easyedit(data: Any, path: Path, limit: int | None = None) -> list[dict]:
    """Validate and convert parsed EasyEdit/KnowEdit data read from ``path``; case ids must be unique."""
    raw = records_list(data, path)
    if limit is not None:
        raw = raw[:limit]
    converted = [convert_record(record, path, index) for index, record in enumerate(raw)]
    seen: dict[int, int] = {}
    for index, record in enumerate(converted):
        if record["case_id"] in seen:
            raise malformed(path, index, "case_id", f"repeats the case_id {record['case_id']} of record "
                            f"{seen[record['case_id']]}")
        seen[record["case_id"]] = index
    if not converted:
        raise SpectraError(f"{path} holds no records.")
    return converted
