"""CounterFact edit metrics: probability comparisons per prompt, plus fluency and consistency of generations.

Tokenization is done once (``prepare_counterfact``) so that an edit loop can re-score the same records
every round with nothing but batched forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
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

PROMPT_KINDS: tuple[str, ...] = ("rewrite", "paraphrase", "neighborhood", "portability")

#: A (prompt, continuation) text pair.
Pair = tuple[str, str]


@dataclass(frozen=True)
class PromptRef:
    """Which record and prompt a scored sequence belongs to."""

    case_id: int
    prompt_kind: str
    prompt_idx: int


@dataclass(frozen=True)
class CounterFactPlan:
    """Token ids of every scored prompt of a set of records, with the two continuations it compares.

    ``new[i]`` is the prompt with what the edit should make the model say (target_new; a
    portability prompt's answer), ``true[i]`` with what it should keep saying (target_true; a
    neighbourhood prompt's own answer). A portability prompt has no ``true`` (None): it is scored
    by its answer's token accuracy alone.
    """

    refs: tuple[PromptRef, ...]
    new: tuple[tuple[list[int], list[int]], ...]
    true: tuple[tuple[list[int], list[int]] | None, ...]
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

    def restricted(self, kinds: Collection[str]) -> "CounterFactPlan":
        """The plan's prompts of ``kinds`` only (e.g. ``("rewrite",)``: efficacy without the other prompts' cost)."""
        keep = [i for i, ref in enumerate(self.refs) if ref.prompt_kind in kinds]
        return CounterFactPlan(tuple(self.refs[i] for i in keep), tuple(self.new[i] for i in keep),
                               tuple(self.true[i] for i in keep), self.pad_id)


def _prompts(record: Mapping[str, Any]) -> list[tuple[str, int, Pair, Pair | None]]:
    """(kind, index, new pair, true pair) of a record's rewrite, paraphrase, neighbourhood and portability prompts.

    A neighbourhood prompt is a string (CounterFact: its answer is the record's target_true) or
    ``{prompt, target}`` (EasyEdit's locality: its own answer); portability prompts are
    ``{prompt, target}`` whose target follows from the edit.
    """
    rewrite = record["requested_rewrite"]
    new, true = rewrite["target_new"]["str"], rewrite["target_true"]["str"]
    prompts = [("rewrite", 0, (rewrite["prompt"].format(rewrite["subject"]), new), (rewrite["prompt"].format(rewrite["subject"]), true))]
    prompts += [("paraphrase", i, (p, new), (p, true)) for i, p in enumerate(record["paraphrase_prompts"])]
    for i, p in enumerate(record["neighborhood_prompts"]):
        text, answer = (p, true) if isinstance(p, str) else (p["prompt"], p["target"])
        prompts.append(("neighborhood", i, (text, new), (text, answer)))
    prompts += [("portability", i, (p["prompt"], p["target"]), None)
                for i, p in enumerate(record.get("portability_prompts", []))]
    return prompts


def prepare_counterfact(tokenizer: object, records: Sequence[Mapping[str, Any]]) -> CounterFactPlan:
    """Tokenize every prompt of ``records`` with its continuations (each with a leading space)."""
    refs, new_texts, true_texts = [], [], []
    for record in records:
        if not (record["requested_rewrite"].get("target_true") or {}).get("str"):
            raise SpectraError(
                f"Record {record['case_id']} has no target_true, which the CounterFact metrics compare against. "
                "Use CounterFact-format records, or EasyEdit/KnowEdit records with a ground_truth (raw zsRE records "
                "are scored with spectra.evaluation.zsre)."
            )
        for kind, index, new, true in _prompts(record):
            refs.append(PromptRef(int(record["case_id"]), kind, index))
            new_texts.append(new)
            true_texts.append(true)
    new_ids = encode_pairs(tokenizer, new_texts)
    paired = [pair for pair in true_texts if pair is not None]
    encoded = iter(encode_pairs(tokenizer, paired) if paired else [])
    true_ids = [None if pair is None else next(encoded) for pair in true_texts]
    return CounterFactPlan(tuple(refs), tuple(new_ids), tuple(true_ids), pad_id_of(tokenizer))


def counterfact_rows(model: nn.Module, plan: CounterFactPlan, batch_size: int = 128) -> list[dict[str, Any]]:
    """Per-prompt rows: ``{kind}_nll_new``, ``{kind}_nll_true``, ``{kind}_success``, ``{kind}_diff``, ``{kind}_acc``.

    Success: the new target wins (NLL lower) on rewrite/paraphrase prompts, the true answer on
    neighbourhood prompts. Diff ("magnitude"): the winner's exp(-mean NLL) minus the loser's. Acc: every
    token of the expected target is the argmax (AlphaEdit's ``*_prompts_correct``). Portability
    prompts give ``portability_nll_new`` and ``portability_acc``: the share of the answer's tokens
    that are the argmax (EasyEdit's portability).
    """
    compared = [pair for pair in plan.true if pair is not None]
    scores = score_continuations(model, [*plan.new, *compared], plan.pad_id, batch_size)
    true_scores = iter(scores[len(plan.new):])
    rows = []
    for ref, new, true_pair in zip(plan.refs, scores[: len(plan.new)], plan.true):
        kind, nll_new = ref.prompt_kind, new.mean_nll
        if true_pair is None:
            values = {"nll_new": nll_new, "acc": new.token_accuracy}
        else:
            true = next(true_scores)
            nll_true = true.mean_nll
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
