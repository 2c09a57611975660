"""Delta: a weight update in (out, in) layout, factored as ``left @ right.T`` when it is low rank.

MEMIT-style updates are rank <= batch size; keeping them factored lets filters and norms run in
O((m + n) b) instead of O(m n). Dense updates (RECT masks, NSE column updates) stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Delta:
    """An update ``dW``: either ``dense`` (m, n) or ``left`` (m, b) and ``right`` (n, b) with dW = left @ right.T."""

    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        factored = self.left is not None and self.right is not None
        if (self.dense is None) == (not factored) or (self.dense is not None and (self.left is not None or self.right is not None)):
            raise ValueError("a Delta is either dense, or factored with both left and right")
        if factored and self.left.shape[1] != self.right.shape[1]:
            raise ValueError(f"factor ranks differ: left {tuple(self.left.shape)}, right {tuple(self.right.shape)}")

    @classmethod
    def factored(cls, left: torch.Tensor, right: torch.Tensor) -> "Delta":
        return cls(left=left, right=right)

    @classmethod
    def of(cls, dense: torch.Tensor) -> "Delta":
        return cls(dense=dense)

    @property
    def is_factored(self) -> bool:
        return self.dense is None

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)  # type: ignore[return-value]
        return (self.left.shape[0], self.right.shape[0])

    def to_dense(self) -> torch.Tensor:
        """The (m, n) matrix."""
        return self.dense if self.dense is not None else self.left @ self.right.T

    def frobenius_norm(self) -> float:
        """||dW||_F without forming dW when factored: sqrt(trace((L^T L)(R^T R)))."""
        if self.dense is not None:
            return float(torch.linalg.matrix_norm(self.dense))
        gram = (self.left.T @ self.left) * (self.right.T @ self.right)
        return float(gram.sum().clamp_min(0).sqrt())

    def spectral_norm(self) -> float:
        """||dW||_2 without forming dW when factored: with L = Q_l R_l and R = Q_r R_r, ||dW||_2 = ||R_l R_r^T||_2."""
        if self.dense is not None:
            return float(torch.linalg.matrix_norm(self.dense.double(), ord=2))
        core = torch.linalg.qr(self.left.double()).R @ torch.linalg.qr(self.right.double()).R.T
        return float(torch.linalg.matrix_norm(core, ord=2))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Delta":
        if self.dense is not None:
            return Delta(dense=self.dense.to(device=device, dtype=dtype))
        return Delta(left=self.left.to(device=device, dtype=dtype), right=self.right.to(device=device, dtype=dtype))
