"""REVIVE filter: spectra's ReviveProjector against the paper's Algorithm 1 written as stated.

For each shape (m, n) = (out, in) a seeded Gaussian weight W and a dense update dW are drawn, and
four things are timed:

- ``alg1``: Appendix D Algorithm 1 as stated, vectorised: the full SVD of W (``full_matrices=True``,
  m x m U and n x n V), all m x n coefficients alpha = U^T dW V, the protected ones (i <= k or
  j <= k) zeroed, and dW_safe = U alpha V^T rebuilt. The algorithm takes the *current* W, so every
  update pays the SVD; its two parts are timed separately (``alg1_svd`` is the per-update "rebuild"
  of the basis, ``alg1_coefficients`` the rest, i.e. Algorithm 1 with the SVD cached).
- ``projector_build``: spectra's one-off cost per weight, a thin SVD plus ReviveProjector.
- ``dense``: ReviveProjector on the dense dW, (I - U_k U_k^T) dW (I - V_k V_k^T).
- ``factored``: ReviveProjector on a rank-b factored update A B^T (MEMIT's form), kept factored.

Checks: the fp32 projection against the same projection in float64 (same bases: the arithmetic),
the projector against Algorithm 1 (independent SVDs: the two top-k subspaces agree only to about
eps * sigma_1 / (sigma_k - sigma_k+1), so ``gap_at_k`` is reported with it), and the factored form
against the dense one.

Algorithm 1 runs in blocks: one Algorithm 1 call, then ``--reps`` calls of each projector form;
each block gives one paired ratio. Algorithm 1 is repeated up to ``--alg1-reps`` times but stops
once it has used ``--alg1-budget`` seconds (at least one call), because at the Llama-3 shape one
call takes minutes on a CPU. The projector's results are checked against Algorithm 1's.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from common import (
    add_common_arguments, environment, paired_ratios, relative_error, resolve_device, summary, sync, timed, write_result,
)
from spectra.spectral import Delta, ReviveProjector, rank_for_energy, svd

#: 768x3072 (GPT-2 small c_proj), 1600x6400 (GPT-2 XL c_proj), 4096x14336 (Llama-3-8B down_proj).
DEFAULT_SHAPES = ("768x3072", "1600x6400", "4096x14336")


def parse_shape(text: str) -> tuple[int, int]:
    """'MxN' -> (M, N)."""
    try:
        m, n = (int(part) for part in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a shape is MxN, e.g. 768x3072; got {text!r}") from err
    if m < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"shape dimensions must be positive; got {text!r}")
    return m, n


def algorithm1(W: torch.Tensor, dW: torch.Tensor, tau: float, device: torch.device) -> tuple[torch.Tensor, float, float, int]:
    """Paper Algorithm 1 on the current W: (dW_safe, SVD seconds, coefficient seconds, k).

    Lines 4-9 and 15-21 loop over all (i, j); the loops are the matrix products U^T dW V and
    U alpha V^T, which is the fastest faithful form (an element loop would be O(m^2 n^2)).
    """
    # On CUDA in float64, as spectra's own SVD (cuSOLVER's float32 SVD is off by ~1e-4; spectra/spectral/decompose.py).
    svd_seconds, (U, S, Vh) = timed(lambda: [f.to(W.dtype) for f in torch.linalg.svd(
        W.double() if W.is_cuda else W, full_matrices=True)], device)
    start = time.perf_counter()
    k = rank_for_energy(S, tau)
    alpha = U.T @ dW @ Vh.T  # (m, n): alpha_ij = <dW, u_i v_j^T>_F for every i, j
    alpha[:k, :] = 0  # drop every coefficient touching a protected u_i ...
    alpha[:, :k] = 0  # ... or a protected v_j
    safe = U @ alpha @ Vh
    sync(device)
    return safe, svd_seconds, time.perf_counter() - start, k


def bench_shape(
    m: int, n: int, tau: float, rank: int, reps: int, alg1_reps: int, alg1_budget: float, device: torch.device, seed: int
) -> dict:
    """All measurements for one (m, n) shape; see the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    W = (torch.randn(m, n, generator=generator) / math.sqrt(n)).to(device)
    dW = (torch.randn(m, n, generator=generator) * 1e-3).to(device)
    A = torch.randn(m, rank, generator=generator).to(device)
    B = (torch.randn(n, rank, generator=generator) * 1e-3).to(device)

    build_seconds, spectrum = timed(lambda: svd(W), device)  # the projector itself only slices the spectrum
    projector = ReviveProjector(spectrum, tau)
    factored_delta = Delta.factored(A, B)
    # Warm-up of both projector forms (allocator, first-call dispatch).
    timed(lambda: projector(dW), device)
    timed(lambda: projector(factored_delta), device)

    alg1_svd: list[float] = []
    alg1_coefficients: list[float] = []
    dense: list[float] = []
    factored: list[float] = []
    dense_block_medians: list[float] = []
    factored_block_medians: list[float] = []
    alg1_k = None
    safe_alg1 = None
    while len(alg1_svd) < alg1_reps and (not alg1_svd or sum(alg1_svd) + sum(alg1_coefficients) < alg1_budget):
        safe_alg1, svd_s, coefficient_s, alg1_k = algorithm1(W, dW, tau, device)
        alg1_svd.append(svd_s)
        alg1_coefficients.append(coefficient_s)
        block_dense = [timed(lambda: projector(dW), device)[0] for _ in range(reps)]
        block_factored = [timed(lambda: projector(factored_delta), device)[0] for _ in range(reps)]
        dense += block_dense
        factored += block_factored
        dense_block_medians.append(statistics.median(block_dense))
        factored_block_medians.append(statistics.median(block_factored))
    alg1_total = [s + c for s, c in zip(alg1_svd, alg1_coefficients)]

    safe_dense = projector(dW)
    safe_dense64 = ReviveProjector(spectrum.to(dtype=torch.float64), tau)(dW.double())
    safe_factored = projector(factored_delta).to_dense()
    factored_as_dense = projector(factored_delta.to_dense())
    S = spectrum.S.double()
    k = projector.k
    return {
        "shape": [m, n],
        "tau": tau,
        "k": projector.k,
        "k_algorithm1": alg1_k,
        "factored_rank": rank,
        "seconds": {
            "alg1": summary(alg1_total),
            "alg1_svd": summary(alg1_svd),
            "alg1_coefficients": summary(alg1_coefficients),
            "projector_build": build_seconds,
            "dense": summary(dense),
            "factored": summary(factored),
        },
        "ratios": {
            "alg1_over_dense": paired_ratios(alg1_total, dense_block_medians),
            "alg1_over_factored": paired_ratios(alg1_total, factored_block_medians),
            "alg1_coefficients_over_dense": paired_ratios(alg1_coefficients, dense_block_medians),
            "dense_over_factored": paired_ratios(dense_block_medians, factored_block_medians),
        },
        "agreement": {
            "dense_vs_float64_rel_fro": relative_error(safe_dense, safe_dense64),
            "dense_vs_alg1_rel_fro": relative_error(safe_dense, safe_alg1),
            "gap_at_k": float((S[k - 1] - S[k]) / S[0]),
            "factored_vs_dense_projector_rel_fro": relative_error(safe_factored, factored_as_dense),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="MxN", help=f"Weight shapes (out x in) [default: {' '.join(DEFAULT_SHAPES)}].")
    parser.add_argument("--tau", type=float, default=0.1, help="REVIVE energy threshold (default 0.1).")
    parser.add_argument("--rank", type=int, default=100, help="Rank b of the factored update (default 100).")
    parser.add_argument("--reps", type=int, default=7, help="Projector calls per form per block (default 7).")
    parser.add_argument("--alg1-reps", type=int, default=3, help="At most this many Algorithm 1 calls per shape (default 3).")
    parser.add_argument("--alg1-budget", type=float, default=150.0,
                        help="Stop repeating Algorithm 1 at a shape once it has used this many seconds (default 150).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random W, dW and factors.")
    add_common_arguments(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    # Initialise LAPACK / cuSOLVER and the thread pool, so that no first measurement pays for it.
    warm = torch.randn(64, 256, device=device)
    svd(warm)
    torch.linalg.svd(warm, full_matrices=True)

    results = []
    for m, n in args.shapes:
        print(f"REVIVE {m}x{n} ...", flush=True)
        row = bench_shape(m, n, args.tau, args.rank, args.reps, args.alg1_reps, args.alg1_budget, device, args.seed)
        s, r = row["seconds"], row["ratios"]
        print(
            f"  k={row['k']}  alg1 {s['alg1']['median']:.3g} s (n={s['alg1']['n']}, SVD {s['alg1_svd']['median']:.3g} s)"
            f"  dense {s['dense']['median'] * 1e3:.3g} ms  factored {s['factored']['median'] * 1e3:.3g} ms"
            f"  alg1/dense {r['alg1_over_dense']['median']:.0f}x  alg1/factored {r['alg1_over_factored']['median']:.0f}x"
            f"  vs float64 {row['agreement']['dense_vs_float64_rel_fro']:.1e}"
            f"  vs alg1 {row['agreement']['dense_vs_alg1_rel_fro']:.1e} (gap {row['agreement']['gap_at_k']:.1e})",
            flush=True,
        )
        results.append(row)
    payload = {
        "benchmark": "revive",
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "shapes")},
        "results": results,
    }
    print(f"wrote {write_result('revive', payload, args.out)}")


if __name__ == "__main__":
    main()
