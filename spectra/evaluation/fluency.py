"""Fluency: top-k sampled generations and their weighted n-gram entropy (the reference's Generation Entropy)."""

from __future__ import annotations

import importlib.util
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from spectra.evaluation.scoring import pad_id_of
from spectra.models.tokens import encode

Compat = Literal["spectra", "alphaedit"]


@dataclass(frozen=True)
class WordTokenizer:
    """A word tokenizer for n-gram counting, with the name a run records in its config."""

    name: str
    tokenize: Callable[[str], list[str]]


# Penn-Treebank-style rules in the spirit of NLTK's NLTKWordTokenizer, applied in order. Each pads the
# pieces it separates with spaces; the text is then split on whitespace.
_OPENING = [
    (re.compile(r"^\""), "``"),
    (re.compile(r"([ (\[{<])(\"|'')"), r"\1 `` "),
    (re.compile(r"(``|[«“‘„])"), r" \1 "),
]
_PUNCTUATION = [
    (re.compile(r"([^.])(\.)([\]\)}>\"']*)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"[;@#$%&?!*]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), " -- "),
]
_CLOSING = [
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"(''|\")"), " '' "),
    (re.compile(r"([^' ])('[sSmMdD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
    (re.compile(r"(?i)\b(can)(not)\b"), r" \1 \2 "),
    (re.compile(r"(?i)\b(gon|wan|got)(na|ta)\b"), r" \1 \2 "),
]


def treebank_tokenize(text: str) -> list[str]:
    """Split ``text`` into Treebank-style words without nltk (close to ``NLTKWordTokenizer().tokenize``)."""
    for pattern, replacement in _OPENING + _PUNCTUATION:
        text = pattern.sub(replacement, text)
    text = f" {text} "
    for pattern, replacement in _CLOSING:
        text = pattern.sub(replacement, text)
    return text.split()


def word_tokenizer() -> WordTokenizer:
    """The best word tokenizer available offline: nltk's ``word_tokenize`` (needs the punkt_tab data),
    else nltk's ``NLTKWordTokenizer``, else spectra's regex version when nltk is not installed."""
    if importlib.util.find_spec("nltk") is not None:
        import nltk

        try:
            nltk.word_tokenize("A test.")
            return WordTokenizer("nltk.word_tokenize", nltk.word_tokenize)
        except LookupError:
            return WordTokenizer("nltk.NLTKWordTokenizer", nltk.tokenize.NLTKWordTokenizer().tokenize)
    return WordTokenizer("spectra.treebank_tokenize", treebank_tokenize)


def _entropy_bits(grams: list[tuple[str, ...]]) -> float:
    """Shannon entropy (bits) of the distinct n-grams' relative frequencies; 0 when there are none."""
    counts = Counter(grams)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def ngram_entropy(text: str, tokenize: Callable[[str], list[str]]) -> float:
    """The reference's per-text fluency: mean of (2/3·H2, 4/3·H3) = (H2 + 2·H3) / 3, in bits (not ×100).

    A text too short for any bigram or trigram contributes 0 for that order (the reference divides by zero).
    """
    words = tokenize(text)
    h2 = _entropy_bits([tuple(words[i : i + 2]) for i in range(len(words) - 1)])
    h3 = _entropy_bits([tuple(words[i : i + 3]) for i in range(len(words) - 2)])
    return (h2 + 2.0 * h3) / 3.0


def clean_generation(text: str) -> str:
    """Normalise a decoded generation as the reference does: NFKD, blank lines to spaces, no ``<|endoftext|>``."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("<|endoftext|>", "")


@torch.no_grad()
def _sample_rows(
    model: nn.Module, rows: list[list[int]], max_out_len: int, top_k: int, generator: torch.Generator, pad_id: int
) -> list[list[int]]:
    """Extend each id list to ``max_out_len`` tokens by top-k sampling, one column at a time.

    Column t holds each row's own prompt token while it has one and a sampled token after that, so
    rows never contain padding and one key/value cache serves the whole batch (as ``generate_fast``).
    """
    device = next(model.parameters()).device
    targets = [max(len(r), max_out_len) for r in rows]
    width = max(targets)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    start = int(lengths.min())
    past, fed = None, 0
    for t in range(start, width):
        window = ids[:, fed:t] if past is not None else ids[:, :t]
        out = model(input_ids=window.to(device), past_key_values=past, use_cache=True)
        past = getattr(out, "past_key_values", None)
        fed = t
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        choice = torch.multinomial((top_p / top_p.sum(-1, keepdim=True)).cpu(), 1, generator=generator)
        sampled = top_i.cpu().gather(1, choice)[:, 0]
        open_rows = lengths <= t
        ids[open_rows, t] = sampled[open_rows]
    return [ids[i, : targets[i]].tolist() for i in range(len(rows))]


def generate_top_k(
    model: nn.Module, tokenizer: object, prompts: Sequence[str], generator: torch.Generator,
    max_out_len: int = 100, top_k: int = 5, batch_size: int = 32, compat: Compat = "spectra",
) -> list[str]:
    """Top-k sampled texts (prompt included) of ``max_out_len`` tokens in total, as the reference generates.

    ``generator`` is a CPU ``torch.Generator`` (sampling happens on CPU so results do not depend on the
    device). ``compat="alphaedit"`` keeps special-token strings in the text, as the reference does.
    """
    pad_id = pad_id_of(tokenizer)
    encoded = [encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(prompts)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        for i, ids in zip(chunk, _sample_rows(model, [encoded[i] for i in chunk], max_out_len, top_k, generator, pad_id)):
            texts[i] = clean_generation(tokenizer.decode(ids, skip_special_tokens=compat != "alphaedit"))
    return texts
