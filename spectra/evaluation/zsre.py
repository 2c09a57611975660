"""zsRE edit metrics: teacher-forced top-1 token accuracy on the rewrite, paraphrase and neighbourhood prompts.

Each (prompt, answer) is tokenized once and scored in one forward pass; the argmax at the position
before answer token j is compared with token j. For a causal model this equals the reference's
prompt + decode(answer[:j]) inputs, without decoding and re-encoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from spectra.evaluation.counterfact import PromptRef
from spectra.evaluation.rows import row
from spectra.evaluation.scoring import encode_pairs, pad_id_of, score_continuations


@dataclass(frozen=True)
class ZsrePlan:
    """Token ids of every (prompt, expected answer) pair of a set of converted zsRE records."""

    refs: tuple[PromptRef, ...]
    pairs: tuple[tuple[list[int], list[int]], ...]
    pad_id: int


def prepare_zsre(tokenizer: object, records: Sequence[Mapping[str, Any]]) -> ZsrePlan:
    """Tokenize rewrite and paraphrase prompts with ``target_new``, neighbourhood prompts with their answer."""
    refs, texts = [], []
    for record in records:
        case_id = int(record["case_id"])
        rewrite = record["requested_rewrite"]
        target = rewrite["target_new"]["str"]
        refs.append(PromptRef(case_id, "rewrite", 0))
        texts.append((rewrite["prompt"].format(rewrite["subject"]), target))
        for i, prompt in enumerate(record["paraphrase_prompts"]):
            refs.append(PromptRef(case_id, "paraphrase", i))
            texts.append((prompt, target))
        for i, neighbour in enumerate(record["neighborhood_prompts"]):
            refs.append(PromptRef(case_id, "neighborhood", i))
            texts.append((neighbour["prompt"], neighbour["target"]))
    return ZsrePlan(tuple(refs), tuple(encode_pairs(tokenizer, texts)), pad_id_of(tokenizer))


def zsre_rows(model: nn.Module, plan: ZsrePlan, batch_size: int = 128) -> list[dict[str, Any]]:
    """Per-prompt rows ``{kind}_acc``: the fraction of answer tokens that are the model's top-1 prediction."""
    scores = score_continuations(model, plan.pairs, plan.pad_id, batch_size)
    return [
        row(ref.case_id, f"{ref.prompt_kind}_acc", ref.prompt_kind, ref.prompt_idx, score.token_accuracy)
        for ref, score in zip(plan.refs, scores)
    ]


def evaluate_zsre(
    model: nn.Module, tokenizer: object, records: Sequence[Mapping[str, Any]], batch_size: int = 128
) -> list[dict[str, Any]]:
    """All zsRE rows for converted records (``spectra.data.zsre``)."""
    return zsre_rows(model, prepare_zsre(tokenizer, records), batch_size)
