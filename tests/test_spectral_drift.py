"""LS and SS (paper Section 2.3), their summaries, drift statistics and the spectrum table."""

from __future__ import annotations

import pytest
import torch

from spectra.errors import SpectraError
from spectra.spectral import (
    drift_stats,
    functional_change,
    ls,
    matrix_with_singular_values,
    spectrum_table,
    ReviveProjector,
    ss,
    ss_best_match,
    ss_summary,
    svd,
)


def random_matrix(m: int = 60, n: int = 90, seed: int = 0) -> torch.Tensor:
    """A matrix with distinct, decaying singular values, so its singular vectors are well defined."""
    r = min(m, n)
    return matrix_with_singular_values(m, n, torch.logspace(0, -2, r), torch.Generator().manual_seed(seed))


def explicit_ls(W0: torch.Tensor, Wt: torch.Tensor, tau: float) -> float:
    """Eq. 3 by the book: reconstruct each matrix from its own top-tau energy, then cosine."""
    def top(W: torch.Tensor) -> torch.Tensor:
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        share = torch.cumsum(S, 0) / S.sum()
        k = int((share < tau).sum()) + 1
        return (U[:, :k] * S[:k]) @ Vh[:k]

    a, b = top(W0), top(Wt)
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_ls_of_a_matrix_with_itself_is_one() -> None:
    """LS(W, W) = 1."""
    W = random_matrix()
    assert ls(W, W) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.3, 1.0])
def test_ls_equals_the_cosine_of_explicit_reconstructions(tau: float) -> None:
    """LS in the singular bases equals the cosine of the formed (m, n) reconstructions."""
    W0 = random_matrix(seed=1)
    Wt = W0 + 0.02 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(2))
    assert ls(W0, Wt, tau) == pytest.approx(explicit_ls(W0, Wt, tau), abs=1e-5)


def test_ls_accepts_spectra_and_tensors_alike() -> None:
    """Passing spectra gives the same value without decomposing again."""
    W0, Wt = random_matrix(seed=3), random_matrix(seed=4)
    assert ls(svd(W0), svd(Wt)) == pytest.approx(ls(W0, Wt), abs=1e-12)
    assert ls(W0, Wt) < 0.5  # unrelated random matrices share little dominant structure


def test_ss_of_a_matrix_with_itself_is_identity_on_the_top_block() -> None:
    """SS(W, W) is (k, r) with the identity in its top-k block and zeros elsewhere, both sides."""
    W = random_matrix(seed=5)
    for side in ("right", "left"):
        m = ss(W, W, tau=0.1, side=side)
        k = svd(W).rank_for(0.1)
        assert m.shape == (k, min(W.shape))
        assert torch.allclose(m[:, :k], torch.eye(k), atol=1e-4)
        assert m[:, k:].abs().max() <= 1e-4


def test_ss_is_absolute_and_sign_invariant() -> None:
    """Flipping the sign of singular vectors changes nothing: SS holds absolute cosines."""
    W = random_matrix(seed=6)
    s = svd(W)
    flipped = type(s)(-s.U, s.S, -s.Vh)
    assert torch.allclose(ss(s, flipped, k=5), ss(s, s, k=5))
    assert (ss(s, flipped, k=5) >= 0).all()


def test_ss_tracks_a_known_rotation() -> None:
    """Rotating v_1 and v_2 by angle theta in their plane gives |cos theta| and |sin theta| entries."""
    g = torch.Generator().manual_seed(7)
    W0 = matrix_with_singular_values(30, 40, torch.linspace(3, 1, 30), g, dtype=torch.float64)
    s0 = svd(W0, dtype=torch.float64)
    theta = 0.3
    c, sn = torch.cos(torch.tensor(theta, dtype=torch.float64)), torch.sin(torch.tensor(theta, dtype=torch.float64))
    Vh = s0.Vh.clone()
    Vh[0], Vh[1] = c * s0.Vh[0] + sn * s0.Vh[1], -sn * s0.Vh[0] + c * s0.Vh[1]
    Wt = (s0.U * s0.S) @ Vh
    st = svd(Wt, dtype=torch.float64)
    m = ss(s0, st, k=2, side="right")
    assert float(m[0, 0]) == pytest.approx(float(c), abs=1e-9)
    assert float(m[0, 1]) == pytest.approx(float(sn), abs=1e-9)
    assert torch.allclose(ss(s0, st, k=2, side="left")[:, :2], torch.eye(2, dtype=torch.float64), atol=1e-9)


def test_ss_default_k_is_the_dominant_rank_of_w0() -> None:
    """k defaults to rank_for_energy(S0, tau)."""
    W0, Wt = random_matrix(seed=8), random_matrix(seed=9)
    assert ss(W0, Wt, tau=0.2).shape[0] == svd(W0).rank_for(0.2)


def test_ss_summary_of_identity_and_of_a_permutation() -> None:
    """Identity: all ones; a swap inside the top block keeps the subspace but breaks the diagonal."""
    eye = torch.eye(4, 10)
    names = ["diag_mean", "diag_min", "row_max_mean", "row_max_min", "argmax_match", "subspace_overlap"]
    assert ss_summary(eye) == pytest.approx({"k": 4, **{name: 1 for name in names}})
    swapped = eye[[1, 0, 2, 3]]
    summary = ss_summary(swapped)
    assert summary["diag_mean"] == pytest.approx(0.5)
    assert summary["row_max_min"] == pytest.approx(1.0)
    assert summary["argmax_match"] == pytest.approx(0.5)
    assert summary["subspace_overlap"] == pytest.approx(1.0)


def test_ss_best_match_sees_intact_triplets_that_lost_their_rank() -> None:
    """A REVIVE-filtered update 10x larger than W keeps W's top-k triplets, but below the update's."""
    W = random_matrix(40, 50)
    gen = torch.Generator().manual_seed(3)
    projector = ReviveProjector(svd(W), tau=0.3)
    k = projector.k
    raw = torch.randn(40, 50, generator=gen)
    safe = projector(raw)
    for delta in (safe, raw):
        delta.mul_(10 * float(W.norm()) / float(delta.norm()))
    kept, damaged = W + safe, W + raw
    for side in ("right", "left"):
        assert ss_best_match(W, kept, k, side=side) > 0.999
        assert float(torch.diagonal(ss(W, kept, k=k, side=side)[:, :k]).min()) < 0.5, "rank order is lost"
        assert ss_best_match(W, damaged, k, side=side) < 0.9
    assert ss_best_match(W, W, 40) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(SpectraError, match="k must lie"):
        ss_best_match(W, kept, 0)


@pytest.mark.parametrize(("kwargs", "match"), [({"side": "up"}, "side"), ({"k": 0}, "k must"), ({"k": 61}, "k must")])
def test_ss_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    """Unknown sides and k outside 1..r raise SpectraError."""
    W = random_matrix()
    with pytest.raises(SpectraError, match=match):
        ss(W, W, **kwargs)


def test_shapes_must_agree() -> None:
    """LS and SS compare a matrix with its own edited version: shapes must match."""
    with pytest.raises(SpectraError, match="same shape"):
        ls(torch.randn(5, 6), torch.randn(6, 5))


def test_drift_stats_against_direct_computation() -> None:
    """Norm ratio, difference norm and conditioning agree with direct linear algebra."""
    W0 = random_matrix(seed=10)
    Wt = 1.5 * W0
    stats = drift_stats(W0, Wt)
    assert stats["fro_ratio"] == pytest.approx(1.5, rel=1e-6)
    assert stats["delta_fro"] == pytest.approx(0.5 * float(W0.double().norm()), rel=1e-6)
    assert stats["delta_fro_rel"] == pytest.approx(0.5, rel=1e-6)
    assert stats["spectral_norm_t"] == pytest.approx(1.5 * stats["spectral_norm_0"], rel=1e-5)
    assert stats["condition_number_0"] == pytest.approx(100.0, rel=1e-3)
    assert stats["effective_rank_t"] == pytest.approx(stats["effective_rank_0"], rel=1e-5)
    given = drift_stats(W0, Wt, spectrum0=svd(W0), spectrum_t=svd(Wt))
    assert given == pytest.approx(stats)
    assert stats["delta_spectral_rel"] == pytest.approx(0.5, rel=1e-5)
    assert stats["spectral_norm_ratio"] == pytest.approx(1.5, rel=1e-5)


def test_delta_spectral_rel_is_the_update_spectral_norm_over_sigma_1() -> None:
    """A rank-one update u v^T of size 3 on a matrix with sigma_1 = 10 gives 0.3, whatever its direction."""
    W0 = matrix_with_singular_values(6, 5, torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1]), torch.Generator().manual_seed(3))
    u, v = torch.randn(6, generator=torch.Generator().manual_seed(1)), torch.randn(5, generator=torch.Generator().manual_seed(2))
    delta = 3.0 * torch.outer(u / u.norm(), v / v.norm())
    assert drift_stats(W0, W0 + delta)["delta_spectral_rel"] == pytest.approx(0.3, rel=1e-5)


def test_functional_change_is_the_rms_output_change_over_the_keys() -> None:
    """Against a per-key loop; input directions no key uses do not count, however large the update there."""
    generator = torch.Generator().manual_seed(4)
    W0, Wt = torch.randn(7, 9, generator=generator), torch.randn(7, 9, generator=generator)
    keys = torch.randn(9, 30, generator=generator)
    changed = sum(float(((Wt - W0) @ keys[:, j]).norm() ** 2) for j in range(30))
    base = sum(float((W0 @ keys[:, j]).norm() ** 2) for j in range(30))
    assert functional_change(W0, Wt, keys) == pytest.approx((changed / base) ** 0.5, rel=1e-5)
    used = torch.zeros(9, 30)
    used[:4] = keys[:4]
    dark = torch.zeros(7, 9)
    dark[:, 4:] = 100.0
    assert functional_change(W0, W0 + dark, used) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(SpectraError, match="keys must be"):
        functional_change(W0, Wt, torch.randn(8, 3))


def test_spectrum_table_row() -> None:
    """Shape, k and k / r per tau, and the scalar summaries of the spectrum."""
    s = svd(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
    row = spectrum_table(s, taus=(0.4, 0.5))
    assert row["m"] == 4 and row["n"] == 4 and row["rank"] == 4
    assert row["k@0.4"] == 1 and row["k_frac@0.4"] == 0.25
    assert row["k@0.5"] == 2 and row["k_frac@0.5"] == 0.5
    assert row["spectral_norm"] == pytest.approx(4.0)
    assert row["condition_number"] == pytest.approx(4.0)


def test_console_line_takes_means_but_the_worst_site_for_residual_and_update_size():
    """round_summary averages over sites, except the protected residual and |dW|2/s1, where the worst site counts."""
    from spectra.experiments.drift import round_summary

    rows = [{"metric": metric, "site": site, "value": value}
            for site, ls_value, residual, delta in (("mlp.down@1", 0.2, 1e-6, 0.5), ("mlp.down@2", 0.6, 3e-5, 2.0))
            for metric, value in (("LS", ls_value), ("protected_triplet_residual", residual),
                                  ("delta_spectral_rel", delta))]
    rows.append({"metric": "SS_protected_diag_min", "site": "mlp.down@1", "side": "left", "value": 0.0})
    rows.append({"metric": "SS_protected_diag_min", "site": "mlp.down@1", "side": "right", "value": 0.9})
    summary = round_summary(rows)
    assert summary["LS"] == pytest.approx(0.4)
    assert summary["protected resid max"] == 3e-5 and summary["|dW|2/s1 max"] == 2.0
    assert summary["SS diag min"] == 0.9, "SS is read on the right side"


def test_regime_note_names_the_arms_whose_update_passed_sigma_k():
    """No note while every last-round update is below sigma_k / sigma_1 at its site; a note naming the arm once one is not."""
    import pandas as pd

    from spectra.experiments.drift import regime_note

    def rows(deltas: dict[str, float]) -> pd.DataFrame:
        limits = [{"arm": "off", "round": 0, "site": site, "metric": "sigma_k_rel", "value": limit}
                  for site, limit in (("mlp.down@1", 0.6), ("mlp.down@2", 0.8))]
        updates = [{"arm": arm, "round": 3, "site": site, "metric": "delta_spectral_rel", "value": deltas[arm]}
                   for arm in deltas for site in ("mlp.down@1", "mlp.down@2")]
        return pd.DataFrame(limits + updates)

    assert regime_note(rows({"off": 0.5, "revive": 0.1})) is None
    note = regime_note(rows({"off": 0.7, "revive": 0.1}))
    assert note is not None and "arm(s) off " in note and "1 of 2 site(s)" in note and "revive" not in note
    assert "2 of 2 site(s)" in regime_note(rows({"off": 0.9, "revive": 0.9}))
    assert regime_note(pd.DataFrame({"metric": ["LS"], "value": [1.0], "round": [0]})) is None
