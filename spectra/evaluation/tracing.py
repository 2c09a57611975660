"""Causal tracing (ROME, Meng et al. 2022): where along the layers and tokens does a model hold a fact?

Noise the subject's input embeddings so the model loses the fact, then restore ONE clean hidden
state (a block's output at one token) and see how much of P(true object) comes back. A state that
restores the answer carries the fact there; MEMIT edits the MLPs whose outputs restore it at the
subject's last token. spectra uses this to choose and justify an editor's layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from spectra.errors import SpectraError
from spectra.models.hooks import capture_hidden, edit_embeddings, edit_hidden
from spectra.models.loading import LoadedModel
from spectra.models.tokens import continuation_ids, subject_last_index

#: Token positions a trace restores: the subject's last token and the prompt's last token.
POSITIONS = ("subject_last", "last")


@dataclass(frozen=True)
class CausalTrace:
    """Mean P(true object) over the traced facts: clean, corrupted, and with one state restored.

    ``restored[position][L]`` restores block L's output at ``position`` (``subject_last`` or
    ``last``) in the corrupted run.
    """

    clean: float
    corrupted: float
    restored: dict[str, list[float]]
    facts: int

    def rows(self) -> list[dict[str, Any]]:
        """Tidy rows (position, layer, probability) plus the clean and corrupted baselines."""
        rows = [{"position": p, "layer": layer, "probability": v}
                for p, values in self.restored.items() for layer, v in enumerate(values)]
        return rows + [{"position": "clean", "layer": None, "probability": self.clean},
                       {"position": "corrupted", "layer": None, "probability": self.corrupted}]


def subject_token_span(tokenizer: object, template: str, subject: str) -> tuple[int, int]:
    """[start, end) token indices of ``subject`` in ``template.format(subject)`` (BOS counted).

    Character offsets place the subject exactly, whatever the tokenizer does at its boundaries;
    the end agrees with ``subject_last_index``, the token MEMIT reads its key at.
    """
    text = template.format(subject)
    first_char = template.index("{}")
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    start = next((i for i, (a, b) in enumerate(offsets) if b > first_char and b > a), None)
    end = subject_last_index(tokenizer, template, subject) + 1
    if start is None or start >= end:
        raise SpectraError(f"Could not find the subject {subject!r} among the tokens of {text!r}.")
    return start, end


@torch.no_grad()
def causal_trace(
    model: LoadedModel, records: Sequence[Mapping[str, Any]], noise_scale: float = 3.0, seed: int = 0,
) -> CausalTrace:
    """Trace every CounterFact-format record's true fact (its rewrite prompt and ``target_true``).

    The noise is Gaussian with standard deviation ``noise_scale`` x the std of the input embedding
    matrix (ROME uses 3x the subject embeddings' std), drawn once per fact and shared by all of its
    restorations. Probabilities are of the true object's first token after the prompt.
    """
    if not records:
        raise SpectraError("Give at least one record to trace.")
    if noise_scale < 0:
        raise SpectraError(f"noise_scale must be non-negative; got {noise_scale}.")
    weight = model.model.get_input_embeddings().weight
    std = float(weight.float().std())
    generator = torch.Generator().manual_seed(seed)
    layers = model.adapter.n_layers
    clean = corrupted = 0.0
    restored = {p: [0.0] * layers for p in POSITIONS}
    for record in records:
        rewrite = record["requested_rewrite"]
        template, subject = rewrite["prompt"], rewrite["subject"]
        prefix, target = continuation_ids(model.tokenizer, template.format(subject), rewrite["target_true"]["str"])
        ids = torch.tensor([prefix], device=model.device)
        start, end = subject_token_span(model.tokenizer, template, subject)
        noise = (noise_scale * std * torch.randn(end - start, weight.shape[1], generator=generator)).to(weight)

        def corrupt(embedded: torch.Tensor) -> torch.Tensor:
            embedded = embedded.clone()
            embedded[0, start:end] += noise
            return embedded

        def probability(*contexts: AbstractContextManager[Any]) -> float:
            with ExitStack() as stack:
                for context in contexts:
                    stack.enter_context(context)
                logits = model.model(input_ids=ids).logits[0, -1].float()
            return float(logits.softmax(-1)[target[0]])

        with ExitStack() as stack:
            states = [stack.enter_context(capture_hidden(model, layer)) for layer in range(layers)]
            clean += probability()
        corrupted += probability(edit_embeddings(model, corrupt))
        for position, index in (("subject_last", end - 1), ("last", len(prefix) - 1)):
            for layer in range(layers):
                restore = partial(_put, index=index, state=states[layer][layer][0, index])
                restored[position][layer] += probability(
                    edit_embeddings(model, corrupt), edit_hidden(model, layer, restore))
    n = len(records)
    return CausalTrace(clean / n, corrupted / n, {p: [v / n for v in values] for p, values in restored.items()}, n)


def _put(hidden: torch.Tensor, index: int, state: torch.Tensor) -> torch.Tensor:
    """``hidden`` (1, length, d) with the state at ``index`` replaced by ``state``."""
    hidden = hidden.clone()
    hidden[0, index] = state
    return hidden
