"""Protection criteria: orthonormal bases of the asked size, energy = the paper's filter, activation and fisher
find the directions a synthetic input distribution or loss makes important, capacity of the complement."""

from __future__ import annotations

import pytest
import torch

from spectra.errors import SpectraError
from spectra.spectral import (
    CRITERIA, Protection, ReviveProjector, activation_scores, complement_usage, fisher_scores, matching_tau,
    matrix_with_singular_values, random_orthonormal, svd,
)

M, N = 40, 64


def spectrum(seed: int = 0, m: int = M, n: int = N):
    """A random matrix with a decaying spectrum (distinct singular values), decomposed in float64."""
    g = torch.Generator().manual_seed(seed)
    S = torch.linspace(3.0, 0.1, min(m, n), dtype=torch.float64) ** 2
    return svd(matrix_with_singular_values(m, n, S, g, dtype=torch.float64), dtype=torch.float64)


def scores_for(criterion: str, s, seed: int = 1) -> torch.Tensor | None:
    return torch.rand(s.rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) \
        if criterion in ("activation", "fisher") else None


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("dim", [1, 7, 40])
def test_every_criterion_returns_orthonormal_bases_of_the_requested_dimension(criterion: str, dim: int) -> None:
    s = spectrum()
    projector = Protection(criterion, dim=dim).projector(s, scores_for(criterion, s))
    assert projector.k == dim and projector.Uk.shape == (M, dim) and projector.Vk.shape == (N, dim)
    eye = torch.eye(dim, dtype=torch.float64)
    assert torch.allclose(projector.Uk.T @ projector.Uk, eye, atol=1e-12)
    assert torch.allclose(projector.Vk.T @ projector.Vk, eye, atol=1e-12)
    # the bases are singular triplets of W0: W0 v_i = sigma_i u_i for every protected i
    W0 = (s.U * s.S) @ s.Vh
    sigma = s.S[projector.indices]
    assert torch.allclose(W0 @ projector.Vk, projector.Uk * sigma, atol=1e-10)


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.3, 0.9])
def test_energy_equals_todays_filter_bit_for_bit(tau: float) -> None:
    s = spectrum(seed=2).to(dtype=torch.float32)
    dW = torch.randn(M, N, generator=torch.Generator().manual_seed(3))
    today, chosen = ReviveProjector(s, tau), Protection("energy", tau=tau).projector(s)
    assert chosen.k == today.k and torch.equal(chosen.Uk, today.Uk) and torch.equal(chosen.Vk, today.Vk)
    assert torch.equal(chosen(dW), today(dW))


def test_thresholds_follow_each_criterions_own_share_and_coincide_at_an_equal_dimension() -> None:
    s = spectrum(seed=4)
    S = s.S
    for tau in (0.1, 0.25, 0.5):
        energy = Protection("energy", tau=tau).size(s)
        assert energy == s.rank_for(tau)
        assert Protection("rank", tau=tau).size(s) == next(k for k in range(1, s.rank + 1) if k >= tau * s.rank - 1e-9)
        squares = torch.cumsum(S**2, 0) / (S**2).sum()
        assert Protection("sigma2", tau=tau).size(s) == int((squares < tau).sum()) + 1
        for scored in ("activation", "fisher"):
            assert Protection(scored, tau=tau).size(s) == energy, "scored criteria spend energy's dimension"
    # sigma^2 is more concentrated than sigma, so it buys fewer directions at the same threshold
    assert Protection("sigma2", tau=0.3).size(s) < Protection("energy", tau=0.3).size(s)
    for dim in (3, 11):
        chosen = {c: Protection(c, dim=dim).indices(s).tolist() for c in ("energy", "rank", "sigma2")}
        assert chosen["energy"] == chosen["rank"] == chosen["sigma2"] == list(range(dim))


def test_activation_picks_the_subspace_the_inputs_live_in() -> None:
    """Inputs x = V_S z confined to the span of five right singular vectors (not the top ones): activation
    protects exactly those five, energy the top five."""
    s = spectrum(seed=5)
    g = torch.Generator().manual_seed(6)
    used = [3, 9, 17, 22, 30]
    inputs = (s.V[:, used] @ torch.randn(len(used), 2000, generator=g, dtype=torch.float64)).T  # (samples, n)
    C = inputs.T @ inputs / inputs.shape[0]
    scores = activation_scores(s, C)
    assert torch.allclose(scores[used], torch.diagonal(s.V[:, used].T @ C @ s.V[:, used]))
    picked = Protection("activation", dim=len(used)).indices(s, scores)
    assert picked.tolist() == used
    assert Protection("energy", dim=len(used)).indices(s).tolist() == [0, 1, 2, 3, 4]
    outside = [i for i in range(s.rank) if i not in used]
    assert float(scores[outside].abs().max()) < 1e-10 * float(scores[used].min())


def test_activation_of_a_general_input_distribution_sums_to_its_energy_in_the_row_space() -> None:
    s = spectrum(seed=7)
    X = torch.randn(500, N, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    C = X.T @ X / 500
    scores = activation_scores(s, C)
    assert torch.allclose(scores, ((X @ s.V) ** 2).mean(0)), "v_i^T C v_i = E[(v_i^T x)^2]"
    assert float(scores.sum()) == pytest.approx(float(torch.trace(s.V.T @ C @ s.V)))


def test_fisher_finds_the_directions_a_quadratic_loss_depends_on() -> None:
    """L_b(W) = 1/2 ||(W - W*) x_b||^2 with W* = W0 - sum_{j in S} c_j u_j v_j^T: at W0 the gradient is
    D x_b x_b^T with D = sum_j c_j u_j v_j^T, so u_i^T G_b v_i = c_i (v_i^T x_b)^2 for i in S and 0 elsewhere.
    The gradients come from autograd; fisher must protect S and nothing else."""
    s = spectrum(seed=9)
    W0 = (s.U * s.S) @ s.Vh
    important, c = [2, 11, 25], torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)
    D = (s.U[:, important] * c) @ s.V[:, important].T
    g = torch.Generator().manual_seed(10)
    expected = torch.zeros(s.rank, dtype=torch.float64)

    def gradients():
        for _ in range(6):
            x = torch.randn(N, 4, generator=g, dtype=torch.float64)  # a mini-batch of 4 inputs
            W = W0.clone().requires_grad_(True)
            loss = 0.5 * ((W - (W0 - D)) @ x).pow(2).sum()
            loss.backward()
            coeff = torch.zeros(s.rank, dtype=torch.float64)
            coeff[important] = c * ((s.V[:, important].T @ x) ** 2).sum(1)
            expected.add_(coeff**2 / 6)
            yield {"site": W.grad}

    scores = fisher_scores({"site": s}, gradients())["site"]
    assert torch.allclose(scores, expected, rtol=1e-9, atol=1e-12)
    assert Protection("fisher", dim=3).indices(s, scores).tolist() == important
    assert Protection("fisher", tau=0.2).indices(s, scores).numel() == s.rank_for(0.2)


def test_matching_tau_gives_rank_and_sigma2_the_total_dimension_energy_protects() -> None:
    spectra_ = [spectrum(seed=i, m=m, n=n) for i, (m, n) in enumerate([(40, 64), (64, 40), (30, 30)])]
    total = sum(Protection("energy", tau=0.2).size(s) for s in spectra_)
    for criterion in ("rank", "sigma2"):
        tau = matching_tau(spectra_, criterion, total)
        got = sum(Protection(criterion, tau=tau).size(s) for s in spectra_)
        assert got >= total
        # sizes change only at cumulative shares: at the largest share below tau the total falls short
        weights = [s.S**2 if criterion == "sigma2" else torch.ones_like(s.S) for s in spectra_]
        shares = sorted({float(x) for w in weights for x in torch.cumsum(w, 0) / w.sum()})
        previous = max(x for x in shares if x < tau)
        assert sum(Protection(criterion, tau=previous).size(s) for s in spectra_) < total, "the smallest such tau"
    with pytest.raises(SpectraError, match="energy's tau"):
        matching_tau(spectra_, "fisher", total)


def test_complement_usage_counts_the_rank_an_update_fills_in_the_complement() -> None:
    s = spectrum(seed=11)
    projector = Protection("energy", dim=6).projector(s)
    g = torch.Generator().manual_seed(12)
    A = random_orthonormal(M, M, g)[:, :5] * torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    delta = projector(A @ torch.randn(5, N, generator=g, dtype=torch.float64))  # rank 5 inside the complement
    usage = complement_usage(delta, projector)
    assert usage == {"rank": 5.0, "effective_rank": pytest.approx(usage["effective_rank"]),
                     "complement_rank": float(M - 6), "remaining": float(M - 6 - 5)}
    assert 1.0 < usage["effective_rank"] < 5.0
    unprotected = complement_usage(delta + s.U[:, :1] @ s.Vh[:1], None)
    assert unprotected["rank"] == 6.0 and unprotected["complement_rank"] == float(M)
    assert complement_usage(torch.zeros(M, N), projector) == {"rank": 0.0, "effective_rank": 0.0,
                                                              "complement_rank": float(M - 6),
                                                              "remaining": float(M - 6)}


@pytest.mark.parametrize("kwargs, needle", [
    (dict(criterion="entropy", tau=0.1), "Unknown protection criterion"),
    (dict(criterion="energy"), "exactly one"),
    (dict(criterion="energy", tau=0.1, dim=3), "exactly one"),
    (dict(criterion="energy", tau=1.0), "strictly between 0 and 1"),
    (dict(criterion="rank", dim=0), "at least 1"),
])
def test_bad_protections_are_one_paragraph_errors(kwargs: dict, needle: str) -> None:
    with pytest.raises(SpectraError, match=needle):
        Protection(**kwargs)


def test_scores_are_checked_against_the_criterion_and_the_spectrum() -> None:
    s = spectrum()
    with pytest.raises(SpectraError, match="none were given"):
        Protection("activation", tau=0.1).indices(s)
    with pytest.raises(SpectraError, match="takes no scores"):
        Protection("energy", tau=0.1).indices(s, torch.ones(s.rank))
    with pytest.raises(SpectraError, match="one per"):
        Protection("fisher", tau=0.1).indices(s, torch.ones(s.rank + 1))
    with pytest.raises(SpectraError, match="at most 40"):
        Protection("energy", dim=41).size(s)
    with pytest.raises(SpectraError, match="exactly one"):
        ReviveProjector(s)
