"""Loadings of an adapter on a layer's components, and its reconstruction error, pure math.

With orthonormal components, the reconstruction dW_hat = U_B (U_B^T B)(A V_A^T) V_A is an
orthogonal projection of dW, and its residual splits into two non-negative parts that need only
r x r products (no out x in matrix, no cancellation of nearly equal numbers):
    dW - dW_hat = (B - B_hat) A + B_hat (A - A_hat),  the cross term vanishes,
    ||dW - dW_hat||^2 = tr(R_B^T R_B  A A^T) + tr(B_hat^T B_hat  R_A R_A^T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass
class ErrorParts:
    """Squared Frobenius norms of the residual and of dW, to sum over layers before the root."""

    residual: float
    total: float

    def __add__(self, other: "ErrorParts") -> "ErrorParts":
        return ErrorParts(self.residual + other.residual, self.total + other.total)

    @property
    def relative(self) -> float:
        """||dW - dW_hat||_F / ||dW||_F (0 for an all-zero update)."""
        return math.sqrt(max(self.residual, 0.0) / self.total) if self.total > 0 else 0.0


def project(down: Tensor, up: Tensor, down_components: Tensor, up_components: Tensor) -> tuple[Tensor, Tensor]:
    """Loadings ``(alpha, beta)``: alpha = A V_A^T (r, K), beta = U_B^T B (K, r), float32.

    ``down`` (r, in) and ``up`` (out, r) may carry a leading batch axis (N adapters of one rank):
    the loadings then do too."""
    alpha = down.float() @ down_components.float().T
    beta = up_components.float().T @ up.float()
    return alpha, beta


def error_parts(down: Tensor, up: Tensor, down_components: Tensor, up_components: Tensor) -> ErrorParts:
    """Residual and total energy of projecting dW = up @ down onto the components (float64)."""
    residual, total = error_parts_batch(down.unsqueeze(0), up.unsqueeze(0), down_components, up_components)
    return ErrorParts(float(residual[0]), float(total[0]))


def error_parts_batch(downs: Tensor, ups: Tensor, down_components: Tensor, up_components: Tensor) -> tuple[Tensor, Tensor]:
    """`error_parts` of N adapters of one rank at once: downs (N, r, in), ups (N, out, r).

    Returns the squared residual and total norms as float64 tensors (N,), on the factors' device
    (no host sync: the caller reads them all at once)."""
    a, b = downs.double(), ups.double()
    v, u = down_components.double().to(a.device), up_components.double().to(a.device)
    a_hat = (a @ v.T) @ v
    b_hat = u @ (u.T @ b)
    residual_a, residual_b = a - a_hat, b - b_hat
    gram_a = a @ a.mT
    residual = ((residual_b.mT @ residual_b) * gram_a).sum((-2, -1)) + ((b_hat.mT @ b_hat) * (residual_a @ residual_a.mT)).sum((-2, -1))
    total = ((b.mT @ b) * gram_a).sum((-2, -1))
    return residual, total


def total_error(parts: list[ErrorParts]) -> ErrorParts:
    """Sum of per-layer parts; ``.relative`` is then the error over all layers of an adapter."""
    summed = ErrorParts(0.0, 0.0)
    for part in parts:
        summed = summed + part
    return summed
