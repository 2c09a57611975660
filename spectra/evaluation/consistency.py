"""Consistency (reference score): TF-IDF cosine between a record's generations and its reference texts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer


def tfidf_vectorizer(vocab: Mapping[str, int], idf: np.ndarray) -> TfidfVectorizer:
    """A vectorizer with a fixed vocabulary and IDF (``tfidf_vocab.json``, ``idf.npy``).

    Fitting on one empty document sets up sklearn's internals; the IDF is then replaced through the
    public ``idf_`` setter (the reference's private-attribute route fails on current sklearn).
    """
    vectorizer = TfidfVectorizer(vocabulary=dict(vocab))
    vectorizer.fit([""])
    vectorizer.idf_ = np.asarray(idf, dtype=np.float64)
    return vectorizer


def fit_tfidf(texts: Sequence[str]) -> TfidfVectorizer:
    """A default ``TfidfVectorizer`` fitted on ``texts`` — how the reference's IDF files were made."""
    return TfidfVectorizer().fit(list(texts))


def reference_score(generated: Sequence[str], references: Sequence[str], vectorizer: TfidfVectorizer) -> float:
    """Cosine of the TF-IDF vectors of all generations joined and all reference texts joined.

    An all-zero vector (e.g. empty generations) scores 0 instead of dividing by zero.
    """
    vectors = vectorizer.transform([" ".join(generated), " ".join(references)]).toarray()
    norms = np.linalg.norm(vectors, axis=1)
    if norms.min() == 0.0:
        return 0.0
    return float(vectors[0] @ vectors[1] / (norms[0] * norms[1]))
