"""SVD routines: the accuracy contract, precision handling, input checks and batching."""

from __future__ import annotations

import pytest
import torch

from spectra.errors import SpectraError
from spectra.spectral import Spectrum, matrix_with_singular_values, svd, svd_many


def assert_contract(W: torch.Tensor, s: Spectrum, tol: float = 1e-5) -> None:
    """||U S Vh - W||_F <= tol ||W||_F, U and V orthonormal to tol, S sorted and non-negative."""
    W64 = W.double()
    U, S, Vh = s.U.double(), s.S.double(), s.Vh.double()
    r = S.numel()
    assert U.shape == (W.shape[0], r) and Vh.shape == (r, W.shape[1])
    assert torch.linalg.matrix_norm((U * S) @ Vh - W64) <= tol * torch.linalg.matrix_norm(W64)
    eye = torch.eye(r, dtype=torch.float64)
    assert (U.T @ U - eye).abs().max() <= tol
    assert (Vh @ Vh.T - eye).abs().max() <= tol
    assert (S[:-1] >= S[1:]).all() and (S >= 0).all()


@pytest.mark.parametrize("shape", [(200, 80), (80, 200), (150, 150)])
@pytest.mark.parametrize("conditioning", ["well", "ill"])
def test_float32_accuracy_contract(shape: tuple[int, int], conditioning: str) -> None:
    """Reconstruction and orthonormality within 1e-5, for condition numbers 2 and 1e6."""
    g = torch.Generator().manual_seed(0)
    r = min(shape)
    S = torch.linspace(1.0, 0.5, r) if conditioning == "well" else torch.logspace(0, -6, r)
    W = matrix_with_singular_values(*shape, S, g, dtype=torch.float32)
    s = svd(W)
    assert s.U.dtype == torch.float32
    assert_contract(W, s)
    # Weyl: singular values move at most by the (float32 rounding + backward) error of the matrix.
    assert (s.S.double() - S.double()).abs().max() <= 1e-5 * float(S[0])


def test_wide_matrix_factors_are_in_out_in_layout() -> None:
    """A wide matrix is decomposed as its transpose, and U / Vh are swapped back: U is (m, r)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 100, generator=g)
    s = svd(W)
    assert s.U.shape == (40, 40) and s.Vh.shape == (40, 100)
    assert s.U.is_contiguous() and s.Vh.is_contiguous()
    assert torch.allclose(W @ s.V, s.U * s.S, atol=1e-4)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_upcast(half: torch.dtype) -> None:
    """float16/bfloat16 inputs are decomposed in float32; the contract holds for the stored matrix."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(64, 96, generator=g).to(half)
    s = svd(W)
    assert s.S.dtype == torch.float32
    assert_contract(W.float(), s)


def test_float64_on_request() -> None:
    """dtype=float64 decomposes in double precision, to double-precision accuracy."""
    g = torch.Generator().manual_seed(3)
    W = matrix_with_singular_values(90, 60, torch.logspace(0, -10, 60), g, dtype=torch.float64)
    s = svd(W, dtype=torch.float64)
    assert s.S.dtype == torch.float64
    assert_contract(W, s, tol=1e-12)


def test_half_precision_compute_dtype_is_refused() -> None:
    """There are no half-precision SVD kernels; asking for one is an error, not a silent upcast."""
    with pytest.raises(SpectraError, match="float32 or float64"):
        svd(torch.randn(4, 4), dtype=torch.float16)


@pytest.mark.parametrize(
    ("bad", "words"), [(float("nan"), "1 NaN and 0 infinite"), (float("inf"), "0 NaN and 1 infinite")]
)
def test_non_finite_weights_are_named(bad: float, words: str) -> None:
    """NaN / inf weights raise SpectraError saying what is wrong."""
    W = torch.randn(5, 7)
    W[2, 3] = bad
    with pytest.raises(SpectraError, match=words):
        svd(W)
    with pytest.raises(SpectraError, match="'layer3'"):
        svd_many({"ok": torch.randn(5, 7), "layer3": W})


@pytest.mark.parametrize("W", [torch.randn(3), torch.zeros(0, 4), torch.ones(3, 3, dtype=torch.long)])
def test_non_matrices_are_refused(W: torch.Tensor) -> None:
    """1-D, empty and integer tensors are not weight matrices."""
    with pytest.raises(SpectraError):
        svd(W)


def test_svd_many_matches_svd_for_mixed_shapes() -> None:
    """Mixed shapes (a wide matrix batched with its tall sibling's shape) come back under their keys."""
    g = torch.Generator().manual_seed(4)
    mats = {
        "a": torch.randn(50, 30, generator=g),
        "b": torch.randn(30, 50, generator=g),
        "c": torch.randn(50, 30, generator=g).to(torch.bfloat16),
        ("d", 1): torch.randn(20, 20, generator=g),
    }
    out = svd_many(mats, progress=False)
    assert list(out) == list(mats)
    for key, W in mats.items():
        assert out[key].shape == tuple(W.shape)
        assert_contract(W.float(), out[key])
        assert torch.allclose(out[key].S, svd(W).S, atol=1e-5)


def test_svd_many_with_progress_bar() -> None:
    """The progress bar is optional and changes nothing."""
    out = svd_many({0: torch.eye(3)}, progress=True)
    assert torch.allclose(out[0].S, torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_svd_many_batches_on_cuda_within_a_small_budget() -> None:
    """On CUDA, chunks sized to a tiny budget still give every spectrum, back on the CPU."""
    g = torch.Generator().manual_seed(5)
    S = torch.logspace(0, -6, 40)
    mats = {i: matrix_with_singular_values(40, 70 if i % 2 else 40, S, g) for i in range(6)}
    mats.update({i + 6: matrix_with_singular_values(70, 40, S, g) for i in range(3)})
    out = svd_many(mats, device="cuda", memory_budget_bytes=80_000)
    for key, W in mats.items():
        assert out[key].U.device.type == "cpu"
        assert_contract(W, out[key])
