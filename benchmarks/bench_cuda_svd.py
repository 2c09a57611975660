"""cuSOLVER's SVD options on a GPU: time and accuracy, the measurement behind spectra's float64 SVD on CUDA.

For each shape (``--shapes``, stacks of random Gaussian matrices scaled by 1/sqrt(n)), each compute
dtype (float32, float64) and each torch driver (default, gesvd, gesvdj), batched and one by one, it
prints the seconds for the whole stack and two errors against float64 LAPACK on the CPU: the
singular values' max |d sigma| / sigma_1 (first four matrices) and U's orthonormality
max |U^T U - I| (first matrix). Output is the table alone; ``results/cuda_svd_drivers.log`` holds an
H100 run. Needs CUDA: the drivers are cuSOLVER's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import resolve_device

DRIVERS = (None, "gesvd", "gesvdj")


def thin_svd(X: torch.Tensor, dtype: torch.dtype, driver: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """U and S of X's thin SVD computed in ``dtype`` with ``driver``, both returned in float64."""
    U, S, _ = torch.linalg.svd(X.to(dtype), full_matrices=False, driver=driver)
    return U.double(), S.double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["3072x768x24", "768x192x18", "14336x4096x2"],
                        help="MxNxCOUNT stacks of tall matrices [default: GPT-2 small's FFN, the tiny model's, "
                             "Llama-3-8B's down_proj].")
    parser.add_argument("--device", default="cuda", help="A CUDA device (default cuda).")
    args = parser.parse_args()
    if not args.device.startswith("cuda"):
        raise SystemExit("bench_cuda_svd.py compares cuSOLVER's drivers, so it needs --device cuda[:N].")
    device = resolve_device(args.device)
    generator = torch.Generator().manual_seed(0)
    for spec in args.shapes:
        m, n, count = (int(x) for x in spec.split("x"))
        mats = torch.randn(count, m, n, generator=generator) / n ** 0.5
        reference = [np.linalg.svd(W.double().numpy(), compute_uv=False) for W in mats[:4]]
        on_device = mats.to(device)
        for dtype in (torch.float32, torch.float64):
            for driver in DRIVERS:
                thin_svd(torch.randn(3, 64, 32, device=device), dtype, driver)  # cuSOLVER's set-up, untimed
                for batched in (True, False):
                    torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    if batched:
                        U, S = thin_svd(on_device, dtype, driver)
                        out = [(U[i], S[i]) for i in range(count)]
                    else:
                        out = [thin_svd(W, dtype, driver) for W in on_device]
                    torch.cuda.synchronize(device)
                    seconds = time.perf_counter() - start
                    sigma = max(float(np.abs(s.cpu().numpy() - r).max() / r[0]) for (_, s), r in zip(out, reference))
                    U0 = out[0][0]
                    orthonormality = float((U0.T @ U0 - torch.eye(U0.shape[1], device=device, dtype=U0.dtype)).abs().max())
                    print(f"{m}x{n} x{count}  {str(dtype):14s} {str(driver):7s} {'batched' if batched else 'loop':8s}"
                          f"{seconds:8.3f} s  sigma err {sigma:.1e}  orth {orthonormality:.1e}", flush=True)


if __name__ == "__main__":
    main()
