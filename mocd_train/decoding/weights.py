"""RMOD's worst-case objective weights (ALGORITHMS.md §3), exact and batched over prompts. Pure torch.

For one prompt with K candidate blocks and their values V [K, G]:
    w* = argmin_{w ∈ Δ^{G−1}} F(w),   F(w) = log (1/K) Σ_k exp(κ Σ_g w_g V_{k,g})
(κ is RMOD's scalar KL trade-off, called λ in the paper; MAP's vector λ is something else). F is convex; with
q_k ∝ exp(κ w·V_k) and m_g = E_q[V_g], the Frank–Wolfe gap κ(Σ_g w_g m_g − min_g m_g) ≥ F(w) − F(w*) certifies a
solution. At w*, every objective with w_g > 0 has the same m_g, and objectives with w_g = 0 have larger m_g.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WeightSolution:
    weights: torch.Tensor  # [N, G]
    gap: torch.Tensor  # [N] Frank–Wolfe gap: an upper bound on F(w) − F(w*)
    objective: torch.Tensor  # [N] F(w)
    iterations: int


def objective(values: torch.Tensor, w: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """F(w) for values [N, K, G], weights [N, G], κ [N] → [N]."""
    z = kappa[:, None] * torch.einsum("nkg,ng->nk", values, w)
    return torch.logsumexp(z, -1) - torch.log(torch.tensor(float(values.shape[1]), dtype=z.dtype))


def _moments(values, w, kappa):
    q = torch.softmax(kappa[:, None] * torch.einsum("nkg,ng->nk", values, w), -1)
    return q, torch.einsum("nk,nkg->ng", q, values)  # q [N, K], m [N, G]


def fw_gap(values: torch.Tensor, w: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    _, m = _moments(values, w, kappa)
    return kappa * ((w * m).sum(-1) - m.min(-1).values)


def worst_case_weights(values: torch.Tensor, kappa: float | torch.Tensor, *, method: str = "exact",
                       tol: float = 1e-9, max_iter: int = 2000, paper_steps: int = 10,
                       paper_lr: float = 1.0) -> WeightSolution:
    """w* per prompt for values [N, K, G] (float64 inside).

    method 'exact': G = 1 trivially; G = 2 by bisection on F'(w_1) to machine precision; G > 2 by pairwise
    Frank–Wolfe with exact line searches until the Frank–Wolfe gap is ≤ tol. method 'paper': the RMOD paper's Eq. 10 (a fixed
    number of multiplicative steps from uniform weights), kept only to compare against."""
    v = values.double()
    n, _, g = v.shape
    kap = torch.as_tensor(kappa, dtype=torch.float64, device=v.device).expand(n).clone()
    if (kap < 0).any():
        raise ValueError("κ must be ≥ 0.")
    if method == "paper":
        w, iters = _exponentiated(v, kap, paper_steps, paper_lr, tol=0.0, backtrack=False)
    elif method != "exact":
        raise ValueError(f"method {method!r} is not 'exact' or 'paper'.")
    elif g == 1:
        w, iters = torch.ones(n, 1, dtype=v.dtype, device=v.device), 0
    elif g == 2:
        w, iters = _two_objectives(v, kap)
    else:
        w, iters = _pairwise(v, kap, tol, max_iter)
    return WeightSolution(w, fw_gap(v, w, kap), objective(v, w, kap), iters)


def _two_objectives(v, kap, iters: int = 64):
    """F(w_1) with w = (w_1, 1 − w_1) is convex, F'(w_1) = κ E_q[V_1 − V_2] is increasing: bisect on its sign."""
    n = v.shape[0]

    def slope(x):
        w = torch.stack([x, 1 - x], -1)
        _, m = _moments(v, w, kap)
        return m[:, 0] - m[:, 1]

    zero, one = torch.zeros(n, dtype=v.dtype, device=v.device), torch.ones(n, dtype=v.dtype, device=v.device)
    at0, at1 = slope(zero), slope(one)
    lo, hi = zero.clone(), one.clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        up = slope(mid) > 0
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    x = 0.5 * (lo + hi)
    x = torch.where(at0 >= 0, zero, torch.where(at1 <= 0, one, x))  # corners: all weight on one objective
    x = torch.where(kap == 0, torch.full_like(x, 0.5), x)  # κ = 0: F is constant; any w is optimal
    return torch.stack([x, 1 - x], -1), iters


def _exponentiated(v, kap, steps, lr, tol, backtrack: bool):
    """The paper's update: w ← w·exp(−η ∇F)/Z from uniform weights, a fixed number of steps."""
    n, _, g = v.shape
    w = torch.full((n, g), 1.0 / g, dtype=v.dtype, device=v.device)
    for _ in range(steps):
        _, m = _moments(v, w, kap)
        step = w * torch.exp(-lr * kap[:, None] * (m - m.min(-1, keepdim=True).values))
        w = step / step.sum(-1, keepdim=True)
    return w, steps


def _pairwise(v, kap, tol, max_iter):
    """Pairwise Frank–Wolfe (SMO-like): move weight from the objective with the largest partial derivative among those
    holding weight to the one with the smallest, by an exact line search. Each step equalises the two partial
    derivatives or empties a coordinate, so exact zeros are reached and convergence is fast for small G."""
    n, _, g = v.shape
    w = torch.full((n, g), 1.0 / g, dtype=v.dtype, device=v.device)
    rows = torch.arange(n, device=v.device)
    it = 0
    for it in range(1, max_iter + 1):
        _, m = _moments(v, w, kap)
        gap = kap * ((w * m).sum(-1) - m.min(-1).values)
        todo = gap > tol
        if not bool(todo.any()):
            break
        best = m.argmin(-1)
        worst = torch.where(w > 0, m, torch.full_like(m, -float("inf"))).argmax(-1)
        d = torch.zeros_like(w)
        d[rows, best] += 1.0
        d[rows, worst] -= 1.0
        alpha = _line_search(v, kap, w, d, w[rows, worst])
        new = (w + alpha[:, None] * d).clamp(min=0)
        new[rows, worst] = torch.where(alpha >= w[rows, worst], torch.zeros_like(alpha), new[rows, worst])
        w = torch.where(todo[:, None], new / new.sum(-1, keepdim=True), w)
    return w, it


def _line_search(v, kap, w, d, alpha_max, iters: int = 60):
    """argmin over α ∈ [0, α_max] of F(w + αd): F is convex along the line, so bisect on the sign of ∇F·d."""
    def slope(a):
        _, m = _moments(v, (w + a[:, None] * d).clamp(min=0), kap)
        return (kap[:, None] * m * d).sum(-1)

    alpha_max = torch.where(torch.isfinite(alpha_max), alpha_max, torch.ones_like(alpha_max))
    lo, hi = torch.zeros_like(alpha_max), alpha_max.clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        up = slope(mid) > 0
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    return torch.where(slope(alpha_max) <= 0, alpha_max, lo)


def select_block(values: torch.Tensor, weights: torch.Tensor, rule: str = "argmax", kappa: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The block to keep per prompt: argmax_k w·V_k (the paper), or a draw ∝ exp(κ w·V_k) ('sample': the
    best-response policy restricted to the K candidates)."""
    scores = torch.einsum("nkg,ng->nk", values.double(), weights.double().to(values.device))
    if rule == "argmax":
        return scores.argmax(-1)
    if rule == "sample":
        probs = torch.softmax(kappa * scores, -1).cpu().float()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(values.device)
    raise ValueError(f"selection rule {rule!r} is not 'argmax' or 'sample'.")
