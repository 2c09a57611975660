"""Singular value decompositions: the one place in spectra where an SVD is computed.

Choices, by measurement (2 CPU cores, float32, torch's LAPACK gesdd):
- Orientation. A thin SVD of a wide 4096 x 14336 matrix took 71 s, of its transpose 27 s; we always
  decompose the tall orientation and swap U and V back.
- No Gram-matrix eigendecomposition. eigh(W W^T) is faster for very rectangular matrices, but it
  squares the condition number: in float32 it loses the small singular values of ill-conditioned
  matrices, and even in float64 the right vectors V = W^T U / sigma lose orthogonality as
  eps * kappa^2 (1e-4 at kappa = 1e6), breaking the accuracy contract below.
- No randomised SVD (svd_lowrank): inexact, and every consumer needs the full spectrum.
- Batching. On CUDA, equal-shape matrices are stacked and decomposed in one call per chunk; on the
  CPU batching gave no speed-up, so we loop.
- float64 on CUDA. cuSOLVER's float32 SVDs break the contract below. Measured on an H100 on random
  matrices (benchmarks/bench_cuda_svd.py), error of the singular values as max |d sigma| / sigma_1,
  then U's orthonormality:
  - Jacobi (torch's default): 1.1e-4 and 3.5e-4 at 3072 x 768 (GPT-2 small's FFN);
    4.8e-4 and 1.6e-3 at 14336 x 4096 (Llama-3-8B's down_proj);
  - QR-based gesvd: 8.9e-6 and 1.3e-5 at 3072 x 768; 4.1e-5 and 1.0e-4 at 14336 x 4096.
  The default driver in float64 gives 4e-8 and under 1e-8 at either shape, in 1.6x the float32 Jacobi
  time and less than gesvd's (24 GPT-2 matrices: 1.45 s, against 0.93 s and 2.2 s; one down_proj:
  1.9 s, against 1.15 s and 1.7 s). So a float32 SVD on CUDA runs in float64 and is rounded back.
  GPUs with slow float64 (most consumer cards) pay more for it.

Accuracy contract for float32: ||U diag(S) Vh - W||_F <= 1e-5 ||W||_F and U, V orthonormal to 1e-5,
for well- and ill-conditioned (singular values spanning 1e-6..1) matrices alike.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch

from spectra.errors import SpectraError
from spectra.progress import stderr_progress
from spectra.spectral.spectrum import Spectrum

K = TypeVar("K", bound=Hashable)

#: dtypes an SVD may run in. LAPACK and cuSOLVER have no half-precision kernels, and half precision
#: would lose the small singular values anyway, so float16/bfloat16 weights are upcast.
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)


def check_matrix(W: torch.Tensor, name: str = "the matrix") -> None:
    """Raise SpectraError unless W is a finite, non-empty, 2-D floating-point tensor."""
    if not isinstance(W, torch.Tensor):
        raise SpectraError(f"Expected {name} to be a torch.Tensor, got {type(W).__name__}.")
    if W.ndim != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise SpectraError(
            f"Expected {name} to be a non-empty 2-D weight matrix in (out, in) layout, got shape "
            f"{tuple(W.shape)}."
        )
    if not W.is_floating_point():
        raise SpectraError(f"Expected {name} to hold floating-point weights, got dtype {W.dtype}.")
    finite = torch.isfinite(W)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(W).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise SpectraError(
            f"{name[0].upper()}{name[1:]} ({tuple(W.shape)}) contains {n_nan} NaN and {n_inf} infinite "
            "entries, so it has no singular value decomposition. The weights are corrupted, most often "
            "by an editing step that diverged or by an overflow in float16; reload the model or lower "
            "the edit's learning rate."
        )


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise SpectraError(
            f"An SVD runs in float32 or float64, not {dtype}: LAPACK and cuSOLVER have no "
            "half-precision kernels, and half precision loses the small singular values."
        )


def _thin_svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's thin SVD of a tall (possibly batched) matrix; on CUDA computed in float64 (see module doc)."""
    if not X.is_cuda:
        return torch.linalg.svd(X, full_matrices=False)
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return U.to(X.dtype), S.to(X.dtype), Vh.to(X.dtype)


def _svd_tall_first(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a (possibly batched) matrix, decomposing its tall orientation (see module doc)."""
    m, n = X.shape[-2:]
    if m >= n:
        return _thin_svd(X)
    # X^T = U' S Vh'  =>  X = Vh'^T S U'^T.
    Ut, S, Vht = _thin_svd(X.mT)
    return Vht.mT.contiguous(), S, Ut.mT.contiguous()


def svd(W: torch.Tensor, dtype: torch.dtype = torch.float32) -> Spectrum:
    """Thin SVD of one (out, in) matrix, returned in ``dtype`` on W's device (on CUDA computed in float64).

    float16/bfloat16 weights are upcast first (no half kernels exist, and half precision would lose
    the small singular values).
    """
    check_matrix(W)
    _check_dtype(dtype)
    U, S, Vh = _svd_tall_first(W.detach().to(dtype))
    return Spectrum(U, S, Vh)


def _bytes_per_matrix(m: int, n: int, itemsize: int) -> int:
    """Rough device memory for one matrix in a batched SVD: input, its work copy, U, S, Vh."""
    r = min(m, n)
    return itemsize * (2 * m * n + m * r + r + r * n)


def svd_many(
    mats: Mapping[K, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    memory_budget_bytes: int | None = None,
    progress: bool = False,
) -> dict[K, Spectrum]:
    """Thin SVDs of many matrices; each Spectrum comes back on its own matrix's device.

    ``device`` is where the decompositions run (default: each matrix's own device). On CUDA, matrices
    of equal shape (a wide matrix counts as its tall transpose) are stacked and decomposed in chunks
    that fit ``memory_budget_bytes`` (default: half the free device memory). On the CPU the matrices
    are decomposed one by one, which measured as fast as batching. ``progress`` shows a progress bar.
    """
    _check_dtype(dtype)
    for key, W in mats.items():
        check_matrix(W, name=f"the matrix '{key}'")
    target = None if device is None else torch.device(device)

    # Group by tall shape so that a matrix and a transposed sibling share a batch.
    by_shape: dict[tuple[int, int, torch.device], list[K]] = {}
    for key, W in mats.items():
        m, n = W.shape
        on = target if target is not None else W.device
        by_shape.setdefault((max(m, n), min(m, n), on), []).append(key)

    chunks: list[tuple[torch.device, list[K]]] = []
    for (tall_m, tall_n, on), keys in by_shape.items():
        if on.type == "cuda":
            budget = memory_budget_bytes
            if budget is None:
                budget = torch.cuda.mem_get_info(on)[0] // 2
            per = _bytes_per_matrix(tall_m, tall_n, torch.finfo(torch.float64).bits // 8)  # computed in float64
            size = max(1, budget // per)
        else:
            size = 1
        chunks.extend((on, keys[i : i + size]) for i in range(0, len(keys), size))

    out: dict[K, Spectrum] = {}
    with _progress_bar(progress, total=len(mats)) as advance:
        for on, keys in chunks:
            # Stack tall orientations; transposing is free for the wide ones.
            tall = [mats[key].detach().to(device=on, dtype=dtype) for key in keys]
            wide = [t.shape[0] < t.shape[1] for t in tall]
            stacked = torch.stack([t.mT if w else t for t, w in zip(tall, wide)])
            U, S, Vh = _thin_svd(stacked)
            for j, key in enumerate(keys):
                u, s, vh = U[j], S[j], Vh[j]
                if wide[j]:
                    u, vh = vh.mT, u.mT
                home = mats[key].device
                out[key] = Spectrum(u.contiguous().to(home), s.contiguous().to(home), vh.contiguous().to(home))
            advance(len(keys))
    return {key: out[key] for key in mats}


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: a rich progress bar when enabled, a no-op otherwise."""
    if not enabled:
        yield lambda n: None
        return
    with stderr_progress(transient=True) as bar:
        task = bar.add_task("SVD", total=total)
        yield lambda n: bar.advance(task, n)
