"""Representation shift: hidden states of factual prompts before/after editing, shift metrics and a joint t-SNE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from sklearn.manifold import TSNE
from torch import nn

from spectra.errors import SpectraError
from spectra.evaluation.scoring import pad_id_of
from spectra.models.adapters import Adapter
from spectra.models.tokens import encode, pad_right, subject_last_index

Position = Literal["subject_last", "last"]


@torch.no_grad()
def hidden_states(
    model: nn.Module,
    tokenizer: object,
    adapter: Adapter,
    prompts: Sequence[tuple[str, str]],
    layer: int,
    position: Position = "subject_last",
    batch_size: int = 64,
) -> torch.Tensor:
    """Block ``layer``'s output (the residual stream after it) at one token of each prompt, as (N, d) float32.

    ``prompts`` are (template with one ``{}``, subject) pairs; ``position`` picks the subject's last token
    (where MEMIT reads its keys; the AlphaEdit t-SNE dump) or the prompt's last token.
    """
    if position not in ("subject_last", "last"):
        raise SpectraError(f"Unknown token position {position!r}: use 'subject_last' or 'last'.")
    rows, indices = [], []
    for template, subject in prompts:
        ids = encode(tokenizer, template.format(subject))
        rows.append(ids)
        indices.append(subject_last_index(tokenizer, template, subject) if position == "subject_last" else len(ids) - 1)
    captured: list[torch.Tensor] = []
    handle = adapter.block(layer).register_forward_hook(lambda _m, _i, out: captured.append(adapter.hidden_of(out)))
    device = next(model.parameters()).device
    states = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = pad_right(rows[start : start + batch_size], pad_id_of(tokenizer)).to(device)
            captured.clear()
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            at = torch.tensor(indices[start : start + batch_size], device=device)
            states.append(captured[0][torch.arange(len(at), device=device), at].float().cpu())
    finally:
        handle.remove()
    return torch.cat(states) if states else torch.empty(0, 0)


def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two (N, d) sets with aligned rows: 1 = same geometry up to rotation and isotropic scale.

    Uses the (N, N) Gram form when N < d and the (d, d) feature form otherwise; both are the same number.
    """
    x, y = _centred(np.asarray(x, np.float64)), _centred(np.asarray(y, np.float64))
    if x.shape[0] < x.shape[1]:
        k, l = x @ x.T, y @ y.T
        cross, norm_x, norm_y = float((k * l).sum()), np.linalg.norm(k), np.linalg.norm(l)
    else:
        cross = float(np.linalg.norm(y.T @ x) ** 2)
        norm_x, norm_y = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    if norm_x == 0.0 or norm_y == 0.0:
        return 0.0
    return cross / float(norm_x * norm_y)


def mean_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over prompts of cos(x_i, y_i)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.mean(np.sum(x * y, axis=1) / np.maximum(norms, 1e-12)))


def relative_drift(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over prompts of ‖y_i − x_i‖ / ‖x_i‖ (the evaluation reference's relative drift)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.mean(np.linalg.norm(y - x, axis=1) / np.maximum(np.linalg.norm(x, axis=1), 1e-12)))


def relative_displacement(x: np.ndarray, y: np.ndarray) -> float:
    """Mean ‖y_i − x_i‖ divided by the spread of X (RMS distance of its points to their centroid).

    Why: residual streams share a large common component, so dividing by ‖x_i‖ hides moves that are
    large compared with how far the prompts lie from each other — which is what a t-SNE shows.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    spread = float(np.sqrt(np.mean(np.sum(_centred(x) ** 2, axis=1))))
    return float(np.mean(np.linalg.norm(y - x, axis=1)) / max(spread, 1e-12))


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    squared = np.sum(x**2, axis=1)
    distances = squared[:, None] + squared[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def knn_overlap(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mean over prompts of |kNN_X(i) ∩ kNN_Y(i)| / k (Euclidean; k capped at N − 1)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = min(k, len(x) - 1)
    if k < 1:
        raise SpectraError("kNN overlap needs at least two prompts.")
    near_x, near_y = _neighbours(x, k), _neighbours(y, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(near_x, near_y)]))


def shift_metrics(pre: torch.Tensor | np.ndarray, post: torch.Tensor | np.ndarray, k: int = 10) -> dict[str, float]:
    """All shift metrics of aligned (N, d) states: cosine, cka, drift, displacement, knn_overlap (at ``k``)."""
    x, y = np.asarray(pre, np.float64), np.asarray(post, np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise SpectraError(f"Pre and post states must be (N, d) arrays of one shape; got {x.shape} and {y.shape}.")
    return {
        "cosine": mean_cosine(x, y),
        "cka": linear_cka(x, y),
        "drift": relative_drift(x, y),
        "displacement": relative_displacement(x, y),
        "knn_overlap": knn_overlap(x, y, k),
    }


def shift_rows(pre: torch.Tensor | np.ndarray, post: torch.Tensor | np.ndarray, k: int = 10) -> list[dict[str, Any]]:
    """``shift_metrics`` as tidy rows ``metric, value``."""
    return [{"metric": name, "value": value} for name, value in shift_metrics(pre, post, k).items()]


def joint_tsne(
    pre: torch.Tensor | np.ndarray, post: torch.Tensor | np.ndarray, seed: int = 0, perplexity: float | None = None,
    max_iter: int = 1000,
) -> list[dict[str, Any]]:
    """One t-SNE fitted on the stacked [pre; post] states, as rows ``prompt_idx, phase, x, y``.

    Fitting once keeps pre and post in the same coordinates (two separate fits have unrelated axes).
    Perplexity defaults to min(30, (2N − 1) / 3), below the 2N samples as sklearn requires; ``max_iter``
    is sklearn's (at least 250).
    """
    x, y = np.asarray(pre, np.float32), np.asarray(post, np.float32)
    if x.shape != y.shape or len(x) < 2:
        raise SpectraError(f"t-SNE needs at least two aligned prompts pre and post; got {x.shape} and {y.shape}.")
    n = len(x)
    perplexity = min(30.0, (2 * n - 1) / 3) if perplexity is None else perplexity
    coords = TSNE(
        n_components=2, init="pca", learning_rate="auto", perplexity=perplexity, random_state=seed,
        max_iter=max_iter,
    ).fit_transform(np.concatenate([x, y]))
    return [
        {"prompt_idx": i % n, "phase": "pre" if i < n else "post", "x": float(px), "y": float(py)}
        for i, (px, py) in enumerate(coords)
    ]
