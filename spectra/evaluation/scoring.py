"""Batched teacher-forced scoring of continuations: per-token NLL and argmax hits from one forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spectra.errors import SpectraError
from spectra.models.tokens import continuation_ids, pad_right


@dataclass(frozen=True)
class ContinuationScore:
    """Per-token scores of one continuation after its prefix.

    ``token_nll[j]`` is -log p(c_j | prefix, c_<j) (natural log); ``token_correct[j]`` says whether c_j
    was the argmax there. Teacher forcing in one pass equals feeding prefix + c_<j step by step,
    because the model is causal.
    """

    token_nll: np.ndarray
    token_correct: np.ndarray

    @property
    def mean_nll(self) -> float:
        """Length-normalised NLL, the reference's probability score."""
        return float(self.token_nll.mean())

    @property
    def all_correct(self) -> bool:
        """Every token is the argmax (the reference's ``*_prompts_correct``)."""
        return bool(self.token_correct.all())

    @property
    def token_accuracy(self) -> float:
        """Fraction of tokens that are the argmax (zsRE's teacher-forced top-1 accuracy)."""
        return float(self.token_correct.mean())


Pair = tuple[Sequence[int], Sequence[int]]


def pad_id_of(tokenizer: object) -> int:
    """The id used to pad (pad, else eos, else 0); its value never matters since pads are never scored."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def encode_pairs(tokenizer: object, texts: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prefix ids, continuation ids) for (prefix, continuation) strings; continuations get a leading space."""
    return [continuation_ids(tokenizer, prefix, target) for prefix, target in texts]


@torch.no_grad()
def score_continuations(
    model: nn.Module, pairs: Sequence[Pair], pad_id: int, batch_size: int = 128
) -> list[ContinuationScore]:
    """Score every (prefix ids, continuation ids) pair, ``batch_size`` sequences per forward pass.

    A pair needs the logits after prefix + continuation[:-1] only (the last token is predicted,
    never fed), and pairs with the same such input share one row: a prompt scored against two
    one-token targets (CounterFact's new and true objects, a choice task's options) costs one
    sequence, not two. Rows are sorted by length so that batches carry little padding,
    right-padded, and read at positions computed from each pair's own prefix length.
    """
    for i, (prefix, continuation) in enumerate(pairs):
        if not prefix or not continuation:
            raise SpectraError(
                f"Cannot score pair {i}: its prefix has {len(prefix)} tokens and its continuation "
                f"{len(continuation)}; both need at least one (check for empty prompts or targets)."
            )
    device = next(model.parameters()).device
    users: dict[tuple[int, ...], list[int]] = {}
    for i, (prefix, continuation) in enumerate(pairs):
        users.setdefault((*prefix, *continuation[:-1]), []).append(i)
    inputs = sorted(users, key=len)
    results: list[ContinuationScore | None] = [None] * len(pairs)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        batch = pad_right([list(ids) for ids in chunk], pad_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        rows, positions, targets, scored = [], [], [], []
        for row, ids in enumerate(chunk):
            for i in users[ids]:
                prefix, continuation = pairs[i]
                rows += [row] * len(continuation)
                positions += range(len(prefix) - 1, len(prefix) + len(continuation) - 1)
                targets += continuation
                scored.append(i)
        selected = logits[torch.tensor(rows, device=device), torch.tensor(positions, device=device)].float()
        target_ids = torch.tensor(targets, device=device)
        nll = -torch.log_softmax(selected, dim=-1).gather(1, target_ids[:, None])[:, 0]
        correct = selected.argmax(dim=-1) == target_ids
        nll_np, correct_np = nll.cpu().numpy(), correct.cpu().numpy()
        offset = 0
        for i in scored:
            length = len(pairs[i][1])
            results[i] = ContinuationScore(nll_np[offset : offset + length], correct_np[offset : offset + length])
            offset += length
    return results  # type: ignore[return-value]
