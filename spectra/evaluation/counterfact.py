"""CounterFact edit metrics: probability comparisons per prompt, plus fluency and consistency of generations.

Tokenization is done once (``prepare_counterfact``) so that an edit loop can re-score the same records
every round with nothing but batched forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from torch import nn

from spectra.errors import SpectraError
from spectra.evaluation.consistency import reference_score
from spectra.evaluation.fluency import Compat, WordTokenizer, generate_top_k, ngram_entropy, word_tokenizer
from spectra.evaluation.rows import RECORD_LEVEL, row
from spectra.evaluation.scoring import encode_pairs, pad_id_of, score_continuations

PROMPT_KINDS: tuple[str, ...] = ("rewrite", "paraphrase", "neighborhood")


@dataclass(frozen=True)
class PromptRef:
    """Which record and prompt a scored sequence belongs to."""

    case_id: int
    prompt_kind: str
    prompt_idx: int


@dataclass(frozen=True)
class CounterFactPlan:
    """Token ids of every (prompt, target_new) and (prompt, target_true) pair of a set of records."""

    refs: tuple[PromptRef, ...]
    new: tuple[tuple[list[int], list[int]], ...]
    true: tuple[tuple[list[int], list[int]], ...]
    pad_id: int

    @staticmethod
    def concat(plans: Sequence["CounterFactPlan"]) -> "CounterFactPlan":
        """One plan scoring every pair of ``plans`` in order (per-record plans prepared once, reused)."""
        if not plans:
            raise SpectraError("Nothing to score: give at least one CounterFact plan.")
        return CounterFactPlan(
            tuple(ref for plan in plans for ref in plan.refs), tuple(pair for plan in plans for pair in plan.new),
            tuple(pair for plan in plans for pair in plan.true), plans[0].pad_id,
        )


def _prompts(record: Mapping[str, Any]) -> list[tuple[str, int, str]]:
    """(kind, index, text) of a record's rewrite, paraphrase and neighbourhood prompts."""
    rewrite = record["requested_rewrite"]
    prompts = [("rewrite", 0, rewrite["prompt"].format(rewrite["subject"]))]
    prompts += [("paraphrase", i, p) for i, p in enumerate(record["paraphrase_prompts"])]
    for i, p in enumerate(record["neighborhood_prompts"]):
        if not isinstance(p, str):
            raise SpectraError(
                f"Record {record['case_id']} has a neighbourhood prompt {p!r} that is not a string: it looks like "
                "a zsRE record. Score zsRE records with spectra.evaluation.zsre, not the CounterFact metrics."
            )
        prompts.append(("neighborhood", i, p))
    return prompts


def prepare_counterfact(tokenizer: object, records: Sequence[Mapping[str, Any]]) -> CounterFactPlan:
    """Tokenize every prompt of ``records`` with both targets (each with a leading space)."""
    refs, new_texts, true_texts = [], [], []
    for record in records:
        rewrite = record["requested_rewrite"]
        true = (rewrite.get("target_true") or {}).get("str")
        if true is None:
            raise SpectraError(
                f"Record {record['case_id']} has no target_true, which the CounterFact metrics compare against. "
                "Use CounterFact-format records (zsRE records are scored with spectra.evaluation.zsre)."
            )
        for kind, index, prompt in _prompts(record):
            refs.append(PromptRef(int(record["case_id"]), kind, index))
            new_texts.append((prompt, rewrite["target_new"]["str"]))
            true_texts.append((prompt, true))
    return CounterFactPlan(
        tuple(refs), tuple(encode_pairs(tokenizer, new_texts)), tuple(encode_pairs(tokenizer, true_texts)),
        pad_id_of(tokenizer),
    )


def counterfact_rows(model: nn.Module, plan: CounterFactPlan, batch_size: int = 128) -> list[dict[str, Any]]:
    """Per-prompt rows: ``{kind}_nll_new``, ``{kind}_nll_true``, ``{kind}_success``, ``{kind}_diff``, ``{kind}_acc``.

    Success: the new target wins (NLL lower) on rewrite/paraphrase prompts, the true target on
    neighbourhood prompts. Diff ("magnitude"): the winner's exp(-mean NLL) minus the loser's. Acc: every
    token of the expected target is the argmax (AlphaEdit's ``*_prompts_correct``).
    """
    scores = score_continuations(model, [*plan.new, *plan.true], plan.pad_id, batch_size)
    n = len(plan.refs)
    rows = []
    for ref, new, true in zip(plan.refs, scores[:n], scores[n:]):
        kind, nll_new, nll_true = ref.prompt_kind, new.mean_nll, true.mean_nll
        expect_new = kind != "neighborhood"
        success = nll_new < nll_true if expect_new else nll_true < nll_new
        diff = math.exp(-nll_new) - math.exp(-nll_true)
        values = {
            "nll_new": nll_new,
            "nll_true": nll_true,
            "success": float(success),
            "diff": diff if expect_new else -diff,
            "acc": float((new if expect_new else true).all_correct),
        }
        rows += [row(ref.case_id, f"{kind}_{name}", kind, ref.prompt_idx, v) for name, v in values.items()]
    return rows


@dataclass(frozen=True)
class GenerationOptions:
    """How generations for Fluency/Consistency are sampled (defaults: the reference's ``generate_fast``)."""

    max_out_len: int = 100
    top_k: int = 5
    batch_size: int = 32
    compat: Compat = "spectra"


def generation_rows(
    model: nn.Module,
    tokenizer: object,
    records: Sequence[Mapping[str, Any]],
    generator: torch.Generator,
    options: GenerationOptions = GenerationOptions(),
    references: Mapping[tuple[str, str], Sequence[str]] | None = None,
    vectorizer: TfidfVectorizer | None = None,
    words: WordTokenizer | None = None,
) -> list[dict[str, Any]]:
    """Rows ``ngram_entropy`` (one per generation prompt) and ``reference_score`` (one per record).

    All records' generation prompts are sampled together in batches. Consistency needs ``references``
    ((relation_id, target_new.id) -> texts) and a ``vectorizer``; records without a matching, non-empty
    reference set get no ``reference_score`` row. Records without generation prompts get no rows.
    """
    words = words or word_tokenizer()
    owners = [(record, i, p) for record in records for i, p in enumerate(record.get("generation_prompts", []))]
    texts = generate_top_k(
        model, tokenizer, [p for _, _, p in owners], generator,
        options.max_out_len, options.top_k, options.batch_size, options.compat,
    )
    rows = []
    by_record: dict[int, list[str]] = {}
    for (record, index, _), text in zip(owners, texts):
        case_id = int(record["case_id"])
        rows.append(row(case_id, "ngram_entropy", "generation", index, ngram_entropy(text, words.tokenize)))
        by_record.setdefault(case_id, []).append(text)
    if references is None or vectorizer is None:
        return rows
    for record in records:
        rewrite = record["requested_rewrite"]
        key = (rewrite.get("relation_id"), rewrite["target_new"].get("id"))
        reference_texts = references.get(key) if None not in key else None
        case_id = int(record["case_id"])
        if reference_texts and case_id in by_record:
            score = reference_score(by_record[case_id], reference_texts, vectorizer)
            rows.append(row(case_id, "reference_score", "generation", RECORD_LEVEL, score))
    return rows


def evaluate_counterfact(
    model: nn.Module,
    tokenizer: object,
    records: Sequence[Mapping[str, Any]],
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    options: GenerationOptions = GenerationOptions(),
    references: Mapping[tuple[str, str], Sequence[str]] | None = None,
    vectorizer: TfidfVectorizer | None = None,
) -> list[dict[str, Any]]:
    """All CounterFact rows for ``records``; generation metrics only when a ``generator`` is given."""
    rows = counterfact_rows(model, prepare_counterfact(tokenizer, records), batch_size)
    if generator is not None:
        rows += generation_rows(model, tokenizer, records, generator, options, references, vectorizer)
    return rows
