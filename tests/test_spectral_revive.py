"""REVIVE filter: equal to the paper's Algorithm 1, idempotent, factored = dense, protects the top-k triplets."""

from __future__ import annotations

import pytest
import torch

from spectra.errors import SpectraError
from spectra.spectral import Delta, ReviveProjector, matrix_with_singular_values, revive, svd

SHAPES = [(120, 60), (60, 120), (80, 80)]


def naive_algorithm_1(W: torch.Tensor, dW: torch.Tensor, tau: float) -> torch.Tensor:
    """Appendix D, Algorithm 1 verbatim, in float64: full SVD, all m x n coefficients, zero i <= k or j <= k."""
    W64, dW64 = W.double(), dW.double()
    U, S, Vh = torch.linalg.svd(W64, full_matrices=True)  # U (m, m), V (n, n): complete bases
    V = Vh.T
    alpha = U.T @ dW64 @ V  # alpha_ij = <dW, u_i v_j^T>_F for every i <= m, j <= n
    energy, total, k = 0.0, float(S.sum()), 0
    while energy / total < tau:  # smallest k with sum_{i<=k} sigma_i / sum sigma >= tau
        energy += float(S[k])
        k += 1
    alpha[:k, :] = 0.0
    alpha[:, :k] = 0.0
    return U @ alpha @ V.T


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_projector_equals_naive_algorithm_1(shape: tuple[int, int], tau: float, seed: int) -> None:
    """(I - UkUk^T) dW (I - VkVk^T) equals Algorithm 1: to 1e-10 from a float64 spectrum (the algebra
    is exact), and from the default float32 one to within the float32 basis of the top-k subspace:
    2 eps32 / relative gap (sigma_k - sigma_k+1) / sigma_1. Measured errors are 0.05-0.55 of that
    bound; a fixed 1e-5 failed at gap 1.3e-3 on another machine's LAPACK (1.2e-5)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g)
    dW = torch.randn(shape, generator=g)
    expected = naive_algorithm_1(W, dW, tau)
    spectrum = svd(W, dtype=torch.float64)
    exact = ReviveProjector(spectrum, tau)
    assert relative_error(exact(dW.double()), expected) <= 1e-10
    S, k = spectrum.S, exact.k
    bound = 2 * torch.finfo(torch.float32).eps * float(S[0] / (S[k - 1] - S[k]))
    assert relative_error(ReviveProjector(svd(W), tau)(dW), expected) <= bound
    assert relative_error(revive(W, dW, tau), expected) <= bound


@pytest.mark.parametrize("shape", SHAPES)
def test_factored_input_gives_the_dense_result_and_stays_factored(shape: tuple[int, int]) -> None:
    """A B^T filtered in factored form equals the dense filter of A B^T; the rank stays b."""
    g = torch.Generator().manual_seed(2)
    m, n = shape
    W = torch.randn(shape, generator=g)
    A, B = torch.randn(m, 5, generator=g), torch.randn(n, 5, generator=g)
    projector = ReviveProjector(svd(W), 0.2)
    out = projector(Delta.factored(A, B))
    assert out.is_factored and out.left.shape == (m, 5) and out.right.shape == (n, 5)
    assert relative_error(out.to_dense(), projector(A @ B.T)) <= 1e-5
    dense = projector(Delta.of(A @ B.T))
    assert not dense.is_factored and torch.allclose(dense.dense, projector(A @ B.T))


@pytest.mark.parametrize("shape", SHAPES)
def test_filter_is_idempotent(shape: tuple[int, int]) -> None:
    """Filtering a filtered update changes nothing."""
    g = torch.Generator().manual_seed(3)
    projector = ReviveProjector(svd(torch.randn(shape, generator=g)), 0.3)
    once = projector(torch.randn(shape, generator=g))
    assert relative_error(projector(once), once) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_safe_update_is_orthogonal_to_the_protected_subspaces(shape: tuple[int, int]) -> None:
    """||Uk^T dW_safe|| and ||dW_safe Vk|| vanish; leakage() reports it for dense and factored updates."""
    g = torch.Generator().manual_seed(4)
    m, n = shape
    projector = ReviveProjector(svd(torch.randn(shape, generator=g)), 0.3)
    dW = torch.randn(shape, generator=g)
    safe = projector(dW)
    norm = torch.linalg.matrix_norm(safe)
    assert torch.linalg.matrix_norm(projector.Uk.T @ safe) <= 1e-5 * norm
    assert torch.linalg.matrix_norm(safe @ projector.Vk) <= 1e-5 * norm
    before = projector.leakage(dW)
    assert before["left"] > 0.1 and before["right"] > 0.1
    assert max(projector.leakage(safe).values()) <= 1e-5
    factored = projector(Delta.factored(torch.randn(m, 3, generator=g), torch.randn(n, 3, generator=g)))
    assert max(projector.leakage(factored).values()) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_top_k_triplets_survive_a_filtered_update(shape: tuple[int, int]) -> None:
    """W + dW_safe keeps every (sigma_i, u_i, v_i), i <= k, as an exact singular triplet; for a small
    update they remain the top k."""
    g = torch.Generator().manual_seed(5)
    m, n = shape
    r = min(shape)
    W = matrix_with_singular_values(m, n, torch.linspace(10.0, 0.1, r), g, dtype=torch.float64)
    s = svd(W, dtype=torch.float64)
    projector = ReviveProjector(s, 0.3)
    k = projector.k
    dW = torch.randn(shape, generator=g, dtype=torch.float64)
    dW = dW * (0.05 * float(s.S[k - 1]) / float(torch.linalg.matrix_norm(dW)))  # small: ||dW|| < sigma_k / 20
    W_new = W + projector(dW)
    U, S, V = s.U[:, :k], s.S[:k], s.V[:, :k]
    scale = float(s.S[0])
    assert (W_new @ V - U * S).abs().max() <= 1e-10 * scale  # W' v_i = sigma_i u_i
    assert (U.T @ W_new - S[:, None] * V.T).abs().max() <= 1e-10 * scale  # u_i^T W' = sigma_i v_i^T
    top = torch.linalg.svdvals(W_new)[:k]
    assert torch.allclose(top, S, rtol=1e-10, atol=1e-10 * scale)
    # An unfiltered update of the same size moves them.
    assert not torch.allclose(torch.linalg.svdvals(W + dW)[:k], S, rtol=1e-6)


def test_half_precision_update_is_projected_in_float32() -> None:
    """A bfloat16 update comes back in bfloat16, projected with float32 bases."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(40, 70, generator=g)
    dW = torch.randn(40, 70, generator=g)
    projector = ReviveProjector(svd(W), 0.2)
    out = projector(dW.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert relative_error(out, projector(dW.to(torch.bfloat16).float())) <= 1e-2


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.5, 2.0])
def test_tau_outside_the_open_unit_interval_is_refused(tau: float) -> None:
    """tau must lie strictly inside (0, 1), for the projector and the function alike."""
    W = torch.randn(10, 12)
    with pytest.raises(SpectraError, match="tau"):
        ReviveProjector(svd(W), tau)
    with pytest.raises(SpectraError, match="tau"):
        revive(W, torch.randn(10, 12), tau)


def test_update_of_another_shape_is_refused() -> None:
    """An update must have the protected weight's shape."""
    projector = ReviveProjector(svd(torch.randn(10, 12)), 0.2)
    with pytest.raises(SpectraError, match="shape"):
        projector(torch.randn(12, 10))
    with pytest.raises(SpectraError, match="shape"):
        projector(Delta.factored(torch.randn(12, 2), torch.randn(10, 2)))


def test_projector_holds_the_dominant_bases() -> None:
    """Uk is (m, k), Vk is (n, k), k = rank_for(tau) of the original weight."""
    s = svd(torch.randn(30, 50, generator=torch.Generator().manual_seed(7)))
    projector = ReviveProjector(s, 0.25)
    assert projector.k == s.rank_for(0.25) and projector.tau == 0.25
    assert projector.Uk.shape == (30, projector.k) and projector.Vk.shape == (50, projector.k)
    assert torch.equal(projector.Vk, s.V[:, : projector.k])
