"""Representation shift metrics and t-SNE rows; padding-correct batching on a tiny random-init Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures.fake_lm import WORDS, tiny_llama, word_tokenizer
from threadpoolctl import threadpool_limits

from spectra.evaluation.representations import hidden_states, joint_tsne, linear_cka, shift_metrics, shift_rows
from spectra.evaluation.scoring import encode_pairs, score_continuations
from spectra.models.adapters import adapter_for


def _rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


@pytest.mark.parametrize(("n", "d"), [(40, 8), (10, 30)])  # feature form and Gram form of CKA
def test_shift_metrics_on_identity_rotation_and_noise(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)) + 3.0
    same = shift_metrics(x, x, k=5)
    assert same["cka"] == pytest.approx(1.0) and same["cosine"] == pytest.approx(1.0)
    assert same["drift"] == 0.0 and same["displacement"] == 0.0 and same["knn_overlap"] == 1.0
    rotated = shift_metrics(x, x @ _rotation(d, rng), k=5)
    assert rotated["cka"] == pytest.approx(1.0) and rotated["cosine"] < 0.99
    assert rotated["knn_overlap"] == pytest.approx(1.0)
    assert linear_cka(x, 2.5 * x + 1.0) == pytest.approx(1.0)
    assert linear_cka(x, rng.standard_normal((n, d))) < 0.6 if n > d else True
    assert [r["metric"] for r in shift_rows(x, x)] == ["cosine", "cka", "drift", "displacement", "knn_overlap"]


def test_displacement_is_relative_to_spread() -> None:
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) + 100.0  # spread 1, norms ~141
    moved = x + np.array([0.5, 0.0])
    metrics = shift_metrics(x, moved, k=2)
    assert metrics["displacement"] == pytest.approx(0.5)
    assert metrics["drift"] == pytest.approx(np.mean(0.5 / np.linalg.norm(x, axis=1)))


def test_joint_tsne_rows() -> None:
    rng = np.random.default_rng(1)
    pre = rng.standard_normal((6, 5)).astype(np.float32)
    with threadpool_limits(1):  # OpenMP threads spin badly on a busy 2-core test machine
        rows = joint_tsne(pre, pre + 0.1, seed=0, max_iter=250)
        again = joint_tsne(pre, pre + 0.1, seed=0, max_iter=250)
    assert len(rows) == 12 and set(rows[0]) == {"prompt_idx", "phase", "x", "y"}
    assert [r["phase"] for r in rows] == ["pre"] * 6 + ["post"] * 6
    assert [r["prompt_idx"] for r in rows] == list(range(6)) * 2
    assert rows == again


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama()


def test_batched_scorer_equals_per_prompt_computation_on_llama(llama: torch.nn.Module) -> None:
    tok = word_tokenizer(bos=True)
    texts = [
        ("the capital of france is", "paris"), ("where does ann live ?", "rome city"), ("a", "b a b"),
        ("nq question : who is bob ?", "rome"), ("ann lives in", "berlin city"),
    ]
    pairs = encode_pairs(tok, texts)
    assert pairs[0][0][0] == 2 and pairs[0][1] == [WORDS.index("paris")]  # BOS on the prefix, not the target
    batched = score_continuations(llama, pairs, pad_id=1, batch_size=5)
    for (prefix, target), score in zip(pairs, batched):
        with torch.no_grad():
            logits = llama(input_ids=torch.tensor([prefix + target])).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        positions = range(len(prefix) - 1, len(prefix) + len(target) - 1)
        expected = [-logp[p, t].item() for p, t in zip(positions, target)]
        hits = [logits[p].argmax().item() == t for p, t in zip(positions, target)]
        assert score.token_nll.tolist() == pytest.approx(expected, abs=1e-5)
        assert score.token_correct.tolist() == hits


def test_hidden_states_batched_equal_unbatched(llama: torch.nn.Module) -> None:
    tok = word_tokenizer(bos=True)
    adapter = adapter_for(llama)
    prompts = [("the capital of {} is", "france"), ("{} lives in", "ann"), ("where does {} live ?", "bob")]
    for position in ("subject_last", "last"):
        states = hidden_states(llama, tok, adapter, prompts, layer=0, position=position, batch_size=3)
        assert states.shape == (3, 32) and states.dtype == torch.float32
        for (template, subject), state in zip(prompts, states):
            ids = tok(template.format(subject))["input_ids"]
            index = ids.index(tok.convert_tokens_to_ids(subject)) if position == "subject_last" else len(ids) - 1
            with torch.no_grad():
                reference = llama(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0, index]
            assert torch.allclose(state, reference, atol=1e-5)
