"""General ability: multiple-choice items scored by the likelihood of their label words, with per-task metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, matthews_corrcoef
from torch import nn

from spectra.data.general import load_general_items
from spectra.data.records import MultipleChoiceItem
from spectra.errors import SpectraError
from spectra.evaluation.scoring import encode_pairs, pad_id_of, score_continuations


def choice_pairs(tokenizer: object, items: Sequence[MultipleChoiceItem]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, " " + choice ids) for every choice of every item, in order."""
    return encode_pairs(tokenizer, [(item.prompt, choice) for item in items for choice in item.choices])


def choice_nlls(
    model: nn.Module, tokenizer: object, items: Sequence[MultipleChoiceItem], batch_size: int = 128,
    pairs: Sequence[tuple[list[int], list[int]]] | None = None,
) -> list[list[float]]:
    """Mean NLL of " " + choice after each item's prompt, for every choice, all items in shared batches.

    ``pairs`` are the items' ``choice_pairs``, when the caller has them already.
    """
    pairs = choice_pairs(tokenizer, items) if pairs is None else pairs
    scores = score_continuations(model, pairs, pad_id_of(tokenizer), batch_size)
    nlls, offset = [], 0
    for item in items:
        nlls.append([s.mean_nll for s in scores[offset : offset + len(item.choices)]])
        offset += len(item.choices)
    return nlls


def predict(
    model: nn.Module, tokenizer: object, items: Sequence[MultipleChoiceItem], batch_size: int = 128,
    pairs: Sequence[tuple[list[int], list[int]]] | None = None,
) -> list[int]:
    """The index of each item's most likely choice (lowest mean NLL; the first one on ties)."""
    return [int(np.argmin(nll)) for nll in choice_nlls(model, tokenizer, items, batch_size, pairs)]


def classification_metrics(gold: Sequence[int], predicted: Sequence[int], n_choices: int) -> dict[str, float]:
    """Accuracy, F1 (binary with choice 1 positive for two choices, else macro) and MCC, as fractions.

    MCC is 0 when gold and predictions hold a single class between them (it is undefined there).
    """
    gold_arr, pred_arr = np.asarray(gold), np.asarray(predicted)
    average = "binary" if n_choices == 2 else "macro"
    labels = list(range(n_choices))
    return {
        "accuracy": float((gold_arr == pred_arr).mean()),
        "f1": float(f1_score(gold_arr, pred_arr, average=average, labels=labels, zero_division=0.0)),
        "mcc": float(matthews_corrcoef(gold_arr, pred_arr)) if len(set(gold) | set(predicted)) > 1 else 0.0,
        "n": float(len(gold_arr)),
    }


@dataclass
class GeneralAbility:
    """A fixed set of items per task, scored on demand: ``ability(model, tokenizer) -> {task: {metric: value}}``.

    Probes and the edit loop hold one of these and call it after every change to the weights.
    Metrics are fractions in [0, 1] (MCC in [-1, 1]); ``n`` is the number of items.
    """

    items: Mapping[str, Sequence[MultipleChoiceItem]]
    batch_size: int = 128
    #: the items' token ids per tokenizer: the edit loop scores the same items every round
    _encoded: dict[int, tuple[object, list[tuple[list[int], list[int]]]]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, model: nn.Module, tokenizer: object) -> dict[str, dict[str, float]]:
        everything = [item for name in self.items for item in self.items[name]]
        if id(tokenizer) not in self._encoded:
            self._encoded[id(tokenizer)] = (tokenizer, choice_pairs(tokenizer, everything))
        pairs = self._encoded[id(tokenizer)][1]
        predictions = predict(model, tokenizer, everything, self.batch_size, pairs)
        results, offset = {}, 0
        for name, items in self.items.items():
            if not items:
                continue
            chosen = predictions[offset : offset + len(items)]
            offset += len(items)
            n_choices = max(len(item.choices) for item in items)
            results[name] = classification_metrics([item.gold for item in items], chosen, n_choices)
        return results

    @classmethod
    def from_file(cls, path: Path, batch_size: int = 128) -> "GeneralAbility":
        """Items from a JSON list of ``{task, prompt, choices, gold}`` (the tiny world's format)."""
        return cls(load_general_items(path), batch_size)


@dataclass
class HeldoutText:
    """General language ability as one continuous number: mean NLL per token of text the model never trained on.

    The choice tasks saturate (a model right on every item stays right under small damage);
    the NLL of held-out text moves with every change of the weights, so it shows how far a
    model has fallen before any task flips. The first token of each text is the prefix, so
    it is never scored (BOS for Llama-style tokenizers).
    """

    texts: Sequence[str]
    batch_size: int = 128
    _encoded: dict[int, tuple[object, list[tuple[list[int], list[int]]]]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.texts = [t.strip() for t in self.texts if t.strip()]
        if not self.texts:
            raise SpectraError("The held-out text for the NLL measure is empty; give at least one line of text.")

    def __call__(self, model: nn.Module, tokenizer: object) -> dict[str, float]:
        """``{"nll": nats per token, "perplexity": exp(nll), "tokens": count}`` over all texts."""
        if id(tokenizer) not in self._encoded:
            rows = [list(tokenizer(text)["input_ids"]) for text in self.texts]
            self._encoded[id(tokenizer)] = (tokenizer, [(row[:1], row[1:]) for row in rows if len(row) > 1])
        pairs = self._encoded[id(tokenizer)][1]
        scores = score_continuations(model, pairs, pad_id_of(tokenizer), self.batch_size)
        total = float(sum(s.token_nll.sum() for s in scores))
        tokens = sum(len(s.token_nll) for s in scores)
        nll = total / tokens
        return {"nll": nll, "perplexity": float(np.exp(nll)), "tokens": float(tokens)}

    @classmethod
    def from_file(cls, path: Path, batch_size: int = 128) -> "HeldoutText":
        """One text per line of a UTF-8 file."""
        if not path.is_file():
            raise SpectraError(f"The held-out text file {path} does not exist; give a text file with one text per line.")
        return cls(path.read_text(encoding="utf-8").splitlines(), batch_size)
