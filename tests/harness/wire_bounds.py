"""Error bounds of a low-precision MoE forward and backward against fp32,
derived (not tuned) for linear experts ``o = A_j x + b_j`` and a softmax
gate without renormalisation (normalize_weights=False).

Notation for token s: ``x_s`` its row, ``G_s`` the incoming gradient of its
output, ``w_sj`` its k gate weights (softmax probabilities, so
``sum_j w_sj <= 1``), ``sigma = max_j ||A_j||_2``, ``beta = max_j ||b_j||_2``,
``||W_g||_2`` the gate's spectral norm. Rounding, per value (docs/api.md):
bfloat16 ``|r(v) - v| <= 2^-8 |v|``; FP8 ``|r(v) - v| <= 2^-4 a_b`` for the
amax ``a_b`` of v's block. So a dispatched row moves by at most
``D_s = 2^-8 ||x_s||`` (bf16) or ``2^-4 sqrt(sum_b n_b a_b^2)`` (FP8, n_b
channels in block b), and a combined row ``o`` by ``u_c ||o||`` (u_c = 2^-8
for bf16, 0 for None).

Output: ``y_s = sum_j w_sj r_c(A_j r_d(x_s) + b_j)``, so
  ``||y_s - y*_s|| <= sum_j w_sj (sigma D_s + u_c ||A_j r_d(x_s) + b_j||)
                   <= sigma D_s + u_c (sigma (||x_s|| + D_s) + beta) =: Delta_s``.
Input gradient, two paths. Through the experts the gradient travels in
combine_dtype both ways: ``sum_j r_c(A_j^T r_c(w_sj G_s))`` against
``sum_j A_j^T w_sj G_s``: at most ``sigma ||G_s|| (2 u_c + u_c^2)``. Through
the gate: ``dL/dw_sj = <G_s, o_sj>`` moves by at most ``||G_s|| Delta_s``
each (Delta_s bounds every expert's row), the k of them by
``sqrt(k) ||G_s|| Delta_s``; the Jacobian of the selected softmax
probabilities has norm <= 1 (a submatrix of diag(p) - p p^T, whose
eigenvalues lie in [0, max p]), then ``W_g^T``. Total:
  ``||dx_s - dx*_s|| <= sigma ||G_s|| (2 u_c + u_c^2) + ||W_g|| sqrt(k) ||G_s|| Delta_s``.
Both sides also round in float32: each dot product of n <= 1024 terms is
within ``gamma_n <= 1024 * 2^-24 = 2^-14`` of exact, relative to the sum of
its terms' magnitudes; two computations: ``2^-13`` of the natural scale
(``sigma ||x_s|| + beta`` for the output, ``(sigma + ||W_g|| sqrt(k)
(sigma ||x_s|| + beta)) ||G_s||`` for the gradient).
"""

from __future__ import annotations

import math

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
FLOAT32_SLACK = 2.0**-13


def unit(dtype: torch.dtype | None) -> float:
    return {None: 0.0, torch.bfloat16: 2.0**-8}[dtype]


def dispatch_error(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``D_s`` per row of x ``[S, M]``."""
    if dtype is None:
        return torch.zeros(x.shape[0], dtype=torch.float64)
    if dtype == torch.bfloat16:
        return 2.0**-8 * x.double().norm(dim=1)
    cols = x.shape[1]
    blocks = math.ceil(cols / BLOCK)
    padded = torch.nn.functional.pad(x.double().abs(), (0, blocks * BLOCK - cols)).view(-1, blocks, BLOCK)
    sizes = torch.tensor([min(BLOCK, cols - b * BLOCK) for b in range(blocks)], dtype=torch.float64)
    return 2.0**-4 * (sizes * padded.amax(-1) ** 2).sum(-1).sqrt()


def bounds(x: torch.Tensor, g: torch.Tensor, sigma: float, beta: float, gate_norm: float, k: int,
           dispatch_dtype: torch.dtype | None, combine_dtype: torch.dtype | None,
           hops: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token bounds on ``||y_s - y*_s||`` and ``||dx_s - dx*_s||``.

    ``hops``: how many times a combine rounds its partial sums on their way
    back (1 for an exchange, 2 for the dedup dispatcher's two hops). Each
    partial sum of a token is at most ``sum_j w_sj ||o_sj||``, so h
    roundings move the output by at most ``((1 + u_c)^h - 1)`` times that,
    and the gradient's way through the experts (one rounding out, h back)
    by ``((1 + u_c)^(h + 1) - 1) sigma ||G_s||``; h = 1 gives the
    ``2 u_c + u_c^2`` above."""
    d = dispatch_error(x, dispatch_dtype)
    uc = unit(combine_dtype)
    xn, gn = x.double().norm(dim=1), g.double().norm(dim=1)
    delta = sigma * d + ((1 + uc) ** hops - 1) * (sigma * (xn + d) + beta)
    out = delta + FLOAT32_SLACK * (sigma * xn + beta)
    grad = sigma * gn * ((1 + uc) ** (hops + 1) - 1) + gate_norm * math.sqrt(k) * gn * delta
    grad = grad + FLOAT32_SLACK * (sigma + gate_norm * math.sqrt(k) * (sigma * xn + beta)) * gn
    return out, grad


def linear_norms(experts: list[torch.nn.Linear]) -> tuple[float, float]:
    """(max spectral norm of the weights, max norm of the biases)."""
    sigma = max(float(torch.linalg.matrix_norm(e.weight.detach().double(), ord=2)) for e in experts)
    beta = max(float(e.bias.detach().double().norm()) for e in experts)
    return sigma, beta
