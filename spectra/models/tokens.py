"""Token bookkeeping shared by editors and scorers: BOS, leading spaces, subject positions.

Positions are computed from per-row lengths, never from the tokenizer's padding side, so the same
code is right for GPT-2 (no BOS) and Llama-style tokenizers (BOS prepended).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def encode(tokenizer: object, text: str) -> list[int]:
    """Token ids of ``text`` exactly as the model sees a sentence (BOS included if the tokenizer adds one)."""
    return list(tokenizer(text)["input_ids"])


def continuation_ids(tokenizer: object, prefix: str, continuation: str) -> tuple[list[int], list[int]]:
    """Split ``prefix + " " + continuation`` into (prefix ids, continuation ids).

    The continuation gets a leading space (word-initial tokens). The split is ids(prefix + " " + c)
    minus ids(prefix); if the tokenizer merges across the boundary, the continuation is tokenized
    on its own (with its space, BOS stripped) instead, so its ids are always word-initial.
    """
    prefix_ids = encode(tokenizer, prefix)
    full_ids = encode(tokenizer, f"{prefix} {continuation.lstrip()}")
    if full_ids[: len(prefix_ids)] == prefix_ids and len(full_ids) > len(prefix_ids):
        return prefix_ids, full_ids[len(prefix_ids):]
    alone = encode(tokenizer, " " + continuation.lstrip())
    bos = getattr(tokenizer, "bos_token_id", None)
    if alone and bos is not None and alone[0] == bos:
        alone = alone[1:]
    return prefix_ids, alone


def subject_last_index(tokenizer: object, template: str, subject: str) -> int:
    """Index of the subject's last token in ``template.format(subject)`` (BOS counted)."""
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' for the subject")
    prefix = template[: template.index("{}")]
    return len(encode(tokenizer, prefix + subject)) - 1


@dataclass
class Batch:
    """Right-padded token ids with each row's true length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths)


def pad_right(rows: list[list[int]], pad_id: int) -> Batch:
    """Stack id lists into a right-padded batch (positions of real tokens are 0..len-1 in every row)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return Batch(ids, mask, [len(r) for r in rows])
