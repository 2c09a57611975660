"""Fluency and consistency: n-gram entropy on fixed strings, word tokenization, seeded top-k generation."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures.fake_lm import BigramLM, tiny_llama, word_tokenizer

from spectra.evaluation.consistency import fit_tfidf, reference_score, tfidf_vectorizer
from spectra.evaluation.fluency import clean_generation, generate_top_k, ngram_entropy, treebank_tokenize, word_tokenizer as words


def _h(*probs: float) -> float:
    return -sum(p * math.log2(p) for p in probs)


def test_ngram_entropy_by_hand() -> None:
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    assert ngram_entropy("a b a b", str.split) == pytest.approx((_h(2 / 3, 1 / 3) + 2 * 1.0) / 3)
    # all n-grams distinct: H2 = log2(5), H3 = log2(4)
    assert ngram_entropy("one two three four five six", str.split) == pytest.approx((math.log2(5) + 2 * 2) / 3)
    assert ngram_entropy("same same same same", str.split) == 0.0
    assert ngram_entropy("alone", str.split) == 0.0


def test_treebank_tokenizer_splits_punctuation_and_clitics() -> None:
    text = 'He said, "It\'s John\'s car (red)." They can\'t stop...'
    assert treebank_tokenize(text) == [
        "He", "said", ",", "``", "It", "'s", "John", "'s", "car", "(", "red", ")", ".", "''",
        "They", "ca", "n't", "stop", "...",
    ]
    assert treebank_tokenize("It costs $5, or 3,000 yen.") == ["It", "costs", "$", "5", ",", "or", "3,000", "yen", "."]
    assert words().name in {"spectra.treebank_tokenize", "nltk.NLTKWordTokenizer", "nltk.word_tokenize"}


def test_clean_generation_matches_reference_normalisation() -> None:
    assert clean_generation("ﬁne\n\nday<|endoftext|>") == "fine day"


def _alternating() -> BigramLM:
    lm = BigramLM()
    lm.set_next("a", {"b": 0.9})
    lm.set_next("b", {"a": 0.9})
    return lm


def test_greedy_like_generation_keeps_prompts_and_total_length() -> None:
    tok = word_tokenizer()
    texts = generate_top_k(
        _alternating(), tok, ["a", "b a b", "a b a b a b a"], torch.Generator().manual_seed(0), max_out_len=6, top_k=1
    )
    assert texts == ["a b a b a b", "b a b a b a", "a b a b a b a"]
    assert ngram_entropy(texts[0], str.split) == pytest.approx((_h(0.6, 0.4) + 2 * 1.0) / 3)


def test_cached_generation_equals_greedy_recomputation_on_llama() -> None:
    tok = word_tokenizer(bos=True)
    model = tiny_llama()
    prompts = ["the capital of france is", "a", "where does ann live ?"]
    texts = generate_top_k(model, tok, prompts, torch.Generator().manual_seed(0), max_out_len=9, top_k=1)
    for prompt, text in zip(prompts, texts):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            while len(ids) < 9:
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert text == tok.decode(ids, skip_special_tokens=True)


def test_top_k_sampling_is_seeded_and_restricted_to_top_k() -> None:
    tok = word_tokenizer()
    lm = BigramLM()
    for word in ("the", "capital", "of"):
        lm.set_next(word, {"capital": 0.3, "of": 0.3, "the": 0.3})
    prompts = ["the", "the capital"]
    first = generate_top_k(lm, tok, prompts, torch.Generator().manual_seed(1), max_out_len=12, top_k=3)
    again = generate_top_k(lm, tok, prompts, torch.Generator().manual_seed(1), max_out_len=12, top_k=3)
    other = generate_top_k(lm, tok, prompts, torch.Generator().manual_seed(2), max_out_len=12, top_k=3)
    assert first == again and first != other
    assert all(set(text.split()) <= {"the", "capital", "of"} for text in first)


def test_reference_score_is_a_tfidf_cosine() -> None:
    vectorizer = fit_tfidf(["rome is a city", "paris is a city", "berlin wall"])
    assert reference_score(["rome city"], ["city rome"], vectorizer) == pytest.approx(1.0)
    assert reference_score(["berlin wall"], ["rome"], vectorizer) == 0.0
    assert reference_score([""], ["rome"], vectorizer) == 0.0
    fixed = tfidf_vectorizer(vectorizer.vocabulary_, vectorizer.idf_)
    assert reference_score(["rome is nice"], ["a city"], fixed) == pytest.approx(
        reference_score(["rome is nice"], ["a city"], vectorizer)
    )
