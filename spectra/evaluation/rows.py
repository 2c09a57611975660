"""Tidy edit-metric rows and their aggregation to the reference's "paper" numbers (×100, per record then mean)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from scipy.stats import hmean

#: Columns of every per-prompt edit-metric row.
ROW_COLUMNS: tuple[str, ...] = ("case_id", "metric", "prompt_kind", "prompt_idx", "value")

#: ``prompt_idx`` of a row that covers all of a record's prompts jointly (Consistency).
RECORD_LEVEL = -1

#: Metrics reported as they are (NLLs in nats); every other edit metric is a fraction scaled by 100.
RAW_METRICS: frozenset[str] = frozenset(
    f"{kind}_nll_{candidate}" for kind in ("rewrite", "paraphrase", "neighborhood", "portability")
    for candidate in ("new", "true")
)

#: The three success rates whose harmonic mean is the reference's ``score``.
SCORE_PARTS: tuple[str, ...] = ("rewrite_success", "paraphrase_success", "neighborhood_success")


def row(case_id: int, metric: str, prompt_kind: str, prompt_idx: int, value: float) -> dict[str, Any]:
    """One tidy row (the columns of ``ROW_COLUMNS``)."""
    return {"case_id": case_id, "metric": metric, "prompt_kind": prompt_kind, "prompt_idx": prompt_idx, "value": value}


def summarize(
    rows: Iterable[Mapping[str, Any]] | pd.DataFrame, scale: float = 100.0, by: Sequence[str] = ()
) -> pd.DataFrame:
    """Per metric (and per ``by`` group, e.g. arm and round): mean and std over records of per-record means.

    Each record's prompts are averaged first, then records — so a record with ten neighbourhood prompts
    weighs as much as one with two, as in the reference's ``summarize.py``. Fractions are multiplied by
    ``scale`` (100 gives the papers' numbers); ``RAW_METRICS`` are not. Columns: ``*by, metric, value,
    std, n_records``.
    """
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if frame.empty:
        frame = pd.DataFrame(columns=[*by, *ROW_COLUMNS])
    keys = [*by, "metric"]
    per_record = frame.groupby([*keys, "case_id"], sort=True)["value"].mean().reset_index()
    table = per_record.groupby(keys, sort=True)["value"].agg(value="mean", std="std", n_records="count").reset_index()
    factor = table["metric"].map(lambda m: 1.0 if m in RAW_METRICS else scale)
    table["value"] *= factor
    table["std"] *= factor
    return table


def aggregate(rows: Iterable[Mapping[str, Any]] | pd.DataFrame, scale: float = 100.0) -> dict[str, float]:
    """``{metric: value}`` for rows of one evaluation (see ``summarize``), plus ``score`` when defined.

    ``score`` is the harmonic mean of rewrite, paraphrase and neighbourhood success (scipy ``hmean``);
    it is 0 when any of them is 0.
    """
    table = summarize(rows, scale)
    values = {str(m): float(v) for m, v in zip(table["metric"], table["value"])}
    if all(part in values for part in SCORE_PARTS):
        parts = [values[part] for part in SCORE_PARTS]
        values["score"] = 0.0 if min(parts) <= 0 else float(hmean(parts))
    return values
