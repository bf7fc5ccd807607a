"""RMOD's worst-case objective weights, exact and batched over prompts (docs/algorithms.md §3). Pure torch.

For one prompt with K candidate blocks and their values V [K, G] (Son et al., ICLR 2026, Eq. 9–10):
    w* = argmin_{w ∈ Δ^{G−1}} F(w),   F(w) = log (1/K) Σ_k exp(κ Σ_g w_g V_{k,g})
(κ is RMOD's scalar KL trade-off, called λ in the paper; MAP's vector λ is something else).

Certificate. With q_k ∝ exp(κ w·V_k) and m_g = E_q[V_g], F(w) = κ w·m − KL(q ‖ uniform), and for any q ∈ Δ_K the
dual value D(q) = κ min_g (Vᵀq)_g − KL(q ‖ uniform) is ≤ F(w*) (minimax over w ∈ Δ and q ∈ Δ_K). So the
Frank–Wolfe gap κ(w·m − min_g m_g) = F(w) − D(q(w)) bounds F(w) − F(w*). At w*, every objective with w_g > 0 has
the same m_g and objectives with w_g = 0 have larger ones (RMOD App. B). `certificate` also tries a polished dual
point, which keeps the bound sharp where the Frank–Wolfe gap hits float64's floor (large κ·|V|).

Method ('exact'): an active-set Newton method inside a continuation in κ.
- Face. Newton's direction on the face of the simplex that holds the weight (Hessian κ² Cov_q(V); Σ d = 0 kept by
  a KKT solve). Once the face is nearly solved (its own gap is under a quarter of the gap), the objectives whose
  m_g lies below the face's lowest join it; a step that drives a weight to zero drops that objective exactly.
- Step. The full Newton step when it is feasible and passes Armijo's test (the usual case, and quadratic
  convergence near w*). Otherwise the best point over step families: the Levenberg–Marquardt path (ridges from
  1e-12 to 1 of (κ·max|V|)², i.e. from Newton to the projected gradient: it moves where F is flat in a direction,
  as when fewer candidates carry q than objectives hold weight), projected steps that can drop several objectives
  at once, and the Frank–Wolfe direction towards argmin_g m_g with halving steps.
- Why it converges: the Frank–Wolfe candidate alone guarantees the descent of Frank–Wolfe with a halving line
  search, which converges for any convex smooth F; the other candidates are taken only when they do better.
- Continuation. At large κ·|V|, F is nearly the piecewise-linear κ max_k w·V_k and Newton's region of fast
  convergence shrinks like 1/κ. So a prompt is solved at κ₀ = 1/max|V| (F nearly linear: the start vertex is almost
  optimal), then at κ₀·8, κ₀·64, … up to κ, each stage to a gap of 0.1 nats from a start extrapolated linearly in
  1/κ from the last two stages (w*(κ) is smooth in 1/κ). Only the last stage runs to the tolerance.
Values are centred per prompt first (F shifts by κ·c; w* and the gap do not change), so raw rewards of any offset
lose no precision. A prompt whose certificate misses the tolerance raises `WeightSolveError` naming it, or warns.

Degenerate cases, defined: κ = 0 (F is constant) and K = 1 or identical candidates (F is linear) return the vertex
of the objective with the lowest mean value over the candidates — the limit of w* as κ → 0⁺ — with ties going to
the lowest index.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from mocd_train.errors import NonFiniteError, WeightSolveError

_GROWTH = 8.0  # κ grows by this factor per continuation stage
_STAGE_GAP = 0.1  # nats: how far an intermediate stage is solved
_STEPS = 10  # step sizes per family: 2^-j, j = 0 … 9
_RIDGES = 10.0 ** torch.arange(-12.0, 1.0, 4.0)  # Levenberg–Marquardt ridges, relative to (κ max|V|)²


@dataclass
class WeightSolution:
    weights: torch.Tensor  # [N, G]
    gap: torch.Tensor  # [N] certified upper bound on F(w) − F(w*)
    objective: torch.Tensor  # [N] F(w)
    iterations: int
    converged: torch.Tensor  # [N] bool: gap ≤ rtol · max(1, |F|)


def check_finite_values(values: torch.Tensor, what: str = "values", rows: list | None = None,
                        objectives: list[str] | None = None) -> None:
    """Raise `NonFiniteError` naming the first bad entry of values [N, K, G]: its row (or `rows[n]`, e.g. a prompt
    and block), candidate and objective."""
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return
    n, k, g = (int(i) for i in bad.nonzero()[0])
    name = objectives[g] if objectives and g < len(objectives) else f"objective {g}"
    row = rows[n] if rows is not None and n < len(rows) else f"row {n}"
    raise NonFiniteError(f"{what}: {float(values[n, k, g])} for {row}, candidate {k}, {name} "
                         f"({int(bad.sum())} non-finite entries in all). A value model that overflows (bf16) or a "
                         "diverged head produces these: score in float32, or retrain the value model.")


def check_kappa(kappa, name: str = "rmod_lambda") -> torch.Tensor:
    kap = torch.as_tensor(kappa, dtype=torch.float64)
    if not bool(torch.isfinite(kap).all()) or bool((kap < 0).any()):
        raise ValueError(f"{name} (κ) must be a finite number ≥ 0, got {kappa}.")
    return kap


def _lse(z: torch.Tensor) -> torch.Tensor:
    """log Σ exp over the last axis of finite z (torch.logsumexp's handling of infinities costs 4× here)."""
    top = z.amax(-1, keepdim=True)
    return (z - top).exp_().sum(-1).log_() + top.squeeze(-1)


def objective(values: torch.Tensor, w: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """F(w) for values [N, K, G], weights [N, G], κ [N] → [N]."""
    return _lse(kappa[:, None] * torch.einsum("nkg,ng->nk", values, w)) - math.log(values.shape[1])


def _moments(values, w, kappa):
    q = torch.softmax(kappa[:, None] * torch.einsum("nkg,ng->nk", values, w), -1)
    return q, torch.einsum("nk,nkg->ng", q, values)  # q [N, K], m [N, G]


def fw_gap(values: torch.Tensor, w: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """κ(w·m − min_g m_g) ≥ F(w) − F(w*)."""
    _, m = _moments(values, w, kappa)
    return kappa * ((w * m).sum(-1) - m.min(-1).values)


def certificate(values: torch.Tensor, w: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """An upper bound on F(w) − F(w*) [N] that stays sharp at any scale: the smaller of the Frank–Wolfe gap and
    F(w) − D(q̂), the duality gap at a polished dual point q̂ = q(w) + Δq, the least change (Σ Δq_k²/q_k) that makes
    (Vᵀq̂)_g equal over supp(w). The FW gap is first order in the error of w, and at large κ·|V| it cannot fall
    below about κ²|V|² times the rounding of w; this one is second order, so it certifies w* as float64 holds it."""
    k, g = values.shape[1:]
    z = kappa[:, None] * torch.einsum("nkg,ng->nk", values, w)
    q = torch.softmax(z, -1)
    m = torch.einsum("nk,nkg->ng", q, values)
    fw = kappa * ((w * m).sum(-1) - m.min(-1).values)
    on = (w > 0).to(values.dtype)
    du = values - m[:, None, :]
    cov = torch.einsum("nk,nkg,nkh->ngh", q, du, du) * on[:, :, None] * on[:, None, :]
    # the least-norm (a, c) with Cov_S a − c·1 = −m_S; Δq_k = q_k (V_k − m)·a then moves every m_g on S to c
    lhs = torch.cat([cov, -on[:, :, None]], -1)
    sol = torch.linalg.lstsq(lhs.cpu(), (-m * on).cpu()[:, :, None], driver="gelsd").solution.to(values.device)
    qh = q + q * torch.einsum("nkg,ng->nk", du, sol[:, :g, 0] * on)
    ok = (qh >= 0).all(-1)
    qh = qh.clamp(min=0)
    qh = qh / qh.sum(-1, keepdim=True)
    dual = kappa * torch.einsum("nk,nkg->ng", qh, values).min(-1).values - torch.special.xlogy(qh, qh * k).sum(-1)
    return torch.where(ok, torch.minimum(fw, _lse(z) - math.log(k) - dual), fw)


def worst_case_weights(values: torch.Tensor, kappa: float | torch.Tensor, *, method: str = "exact",
                       rtol: float = 1e-9, max_iter: int = 300, on_unconverged: str = "raise",
                       paper_steps: int = 10, paper_lr: float = 1.0) -> WeightSolution:
    """w* per prompt for values [N, K, G] (float64 inside), with its certificate.

    method 'exact' (the module docstring) returns weights whose certified gap is ≤ rtol · max(1, |F|); a prompt
    that misses it raises `WeightSolveError` (`on_unconverged='raise'`) or warns ('warn'). method 'paper': the RMOD
    paper's Eq. 10 (a fixed number of multiplicative steps from uniform weights), kept only to compare against."""
    if values.dim() != 3:
        raise ValueError(f"values must be [N, K, G], got shape {tuple(values.shape)}.")
    check_finite_values(values)
    if method not in ("exact", "paper"):
        raise ValueError(f"method {method!r} is not 'exact' or 'paper'.")
    if on_unconverged not in ("raise", "warn"):
        raise ValueError(f"on_unconverged {on_unconverged!r} is not 'raise' or 'warn'.")
    v = values.double()
    n = v.shape[0]
    kap = check_kappa(kappa).to(v.device).expand(n).clone()
    centre = v.mean((1, 2))
    u = v - centre[:, None, None]
    if method == "paper":
        w, iters = _exponentiated(u, kap, paper_steps, paper_lr)
    else:
        w, iters = _solve(u, kap, centre, rtol, max_iter)
    gap, f = certificate(u, w, kap), objective(u, w, kap) + kap * centre
    converged = gap <= rtol * f.abs().clamp(min=1)
    if method == "exact" and not bool(converged.all()):
        rows = (~converged).nonzero().flatten().tolist()
        msg = (f"worst-case weights did not converge for {len(rows)} of {n} prompts (rows {rows[:10]}"
               f"{'…' if len(rows) > 10 else ''}; largest gap {float(gap.max()):.3g} at κ = "
               f"{float(kap[rows[0]]):g}); the weights are the best found.")
        if on_unconverged == "raise":
            raise WeightSolveError(msg, rows)
        warnings.warn(msg, stacklevel=2)
    return WeightSolution(w, gap, f, iters, converged)


def _exponentiated(v, kap, steps, lr):
    """The paper's update: w ← w·exp(−η ∇F)/Z from uniform weights, a fixed number of steps (in log space, where
    it cannot underflow to 0/0)."""
    n, _, g = v.shape
    w = torch.full((n, g), 1.0 / g, dtype=v.dtype, device=v.device)
    for _ in range(steps):
        _, m = _moments(v, w, kap)
        w = torch.softmax(w.log() - lr * kap[:, None] * m, -1)
    return w, steps


def _solve(u, kap, centre, rtol, max_iter):
    """The 'exact' method on centred values u [N, K, G] (centre [N]: what was subtracted) → w [N, G], iterations.

    A prompt stops once its FW gap is 100× below the tolerance, or after three steps that neither lower F beyond
    rounding nor halve the gap (float64's floor); it returns its iterate with the smallest gap."""
    n, k, g = u.shape
    dev, dt = u.device, u.dtype
    w = torch.zeros(n, g, dtype=dt, device=dev)
    w[torch.arange(n, device=dev), u.mean(1).argmin(-1)] = 1.0  # the κ → 0⁺ solution; the answer at κ = 0, K = 1
    if g == 1:
        return w, 0
    umax = u.abs().amax((1, 2))
    kap0 = (1 / umax.clamp(min=1e-300)).minimum(kap)
    stages = torch.ceil(torch.log(torch.where(kap > 0, kap / kap0.clamp(min=1e-300), 1.0)).clamp(min=0)
                        / math.log(_GROWTH)).long()
    stage = torch.zeros(n, dtype=torch.long, device=dev)
    prev_w, prev_k = w.clone(), torch.zeros(n, dtype=dt, device=dev)  # the last stage's solution and its κ
    best_w, best_gap = w.clone(), torch.full((n,), float("inf"), dtype=dt, device=dev)
    stall = torch.zeros(n, dtype=torch.long, device=dev)
    running = torch.ones(n, dtype=torch.bool, device=dev)
    it = 0
    while it < max_iter and bool(running.any()):
        it += 1
        idx = running.nonzero().flatten()
        at = torch.arange(len(idx), device=dev)
        wi, ui = w[idx], u[idx]
        last = stage[idx] >= stages[idx]
        ki = torch.where(last, kap[idx], kap0[idx] * _GROWTH ** stage[idx].to(dt))
        scale = ki * umax[idx]  # ≥ |κ w·u_k| for every w ∈ Δ
        noise = 1e-14 * scale.clamp(min=1)  # rounding in F
        z = ki[:, None] * torch.einsum("nkg,ng->nk", ui, wi)
        f, q = _lse(z), torch.softmax(z, -1)
        m = torch.einsum("nk,nkg->ng", q, ui)
        low = m.argmin(-1)
        wm = (wi * m).sum(-1)
        gap = ki * (wm - m[at, low])

        stall[idx] = torch.where(~last | (gap <= 0.5 * best_gap[idx]), 0, stall[idx] + 1)
        better = last & (gap < best_gap[idx])
        best_w[idx] = torch.where(better[:, None], wi, best_w[idx])
        best_gap[idx] = torch.where(better, gap, best_gap[idx])
        done = last & (gap <= 0.01 * rtol * (f - math.log(k) + ki * centre[idx]).abs().clamp(min=1))
        advance = ~last & (gap <= _STAGE_GAP)
        if bool(advance.any()):  # next stage, from a start extrapolated linearly in 1/κ
            nxt = torch.where(stage[idx] + 1 >= stages[idx], kap[idx], ki * _GROWTH)
            pk = prev_k[idx]
            slope = torch.where(pk > 0, (1 / nxt - 1 / ki) / (1 / ki - 1 / pk.clamp(min=1e-300)), 0.0)
            pred = (wi + slope[:, None] * (wi - prev_w[idx])).clamp(min=0)
            pred = pred / pred.sum(-1, keepdim=True)
            prev_w[idx] = torch.where(advance[:, None], wi, prev_w[idx])
            prev_k[idx] = torch.where(advance, ki, pk)
            stage[idx] += advance.long()

        # the face: supp(w), grown by the objectives below its lowest m_g once it is nearly solved
        face = wi > 0
        face_low = torch.where(face, m, float("inf")).min(-1).values
        face = face | ((ki * (wm - face_low) <= 0.25 * gap)[:, None] & (m < face_low[:, None]))
        du = ui - m[:, None, :]
        hess = ki[:, None, None] ** 2 * torch.einsum("nk,nkg,nkh->ngh", q, du, du)
        grad = ki[:, None] * m
        ridges = scale.clamp(min=1e-150)[:, None] ** 2 * _RIDGES.to(dt)
        d = _face_steps(hess, grad, face, ridges[:, :1])[:, 0]
        leave = (wi <= 0) & (d < 0)  # a zero weight the direction would push negative stays off the face
        if bool(leave.any()):
            face = face & ~leave
            d = _face_steps(hess, grad, face, ridges[:, :1])[:, 0]
        w_new = wi + d
        f_new = _lse(ki[:, None] * torch.einsum("nkg,ng->nk", ui, w_new))
        slow = ~((w_new >= 0).all(-1) & (f_new <= f + 1e-4 * (grad * d).sum(-1) + noise))
        if bool(slow.any()):
            dirs = torch.cat([d[slow, None], _face_steps(hess[slow], grad[slow], face[slow], ridges[slow, 1:])], 1)
            fw = -wi[slow]
            fw[torch.arange(len(fw), device=dev), low[slow]] += 1.0
            w_new[slow], f_new[slow] = _search(ui[slow], ki[slow], wi[slow], noise[slow], dirs, fw)
        w_new = w_new.clamp(min=0)
        w_new = w_new / w_new.sum(-1, keepdim=True)
        stall[idx] = torch.where(f_new < f - noise, 0, stall[idx])
        w_next = torch.where((f_new <= f + noise)[:, None], w_new, wi)
        w[idx] = torch.where(advance[:, None], pred, w_next) if bool(advance.any()) else w_next
        running[idx] = ~(done | (stall[idx] >= 3))
    return best_w, it


def _face_steps(hess, grad, face, ridges):
    """For each ridge ρ [N, R]: argmin_d gᵀd + ½ dᵀ(H + ρI)d subject to Σ d = 0 and d_g = 0 off the face, by one
    KKT solve per prompt and ridge → [N, R, G]. Small ρ gives Newton's step; large ρ tends to the projected
    gradient (the Levenberg–Marquardt path)."""
    n, g = grad.shape
    r = ridges.shape[1]
    on = face.to(hess.dtype)
    eye = torch.eye(g, dtype=hess.dtype, device=hess.device)
    block = (hess * on[:, :, None] * on[:, None, :] + eye * (1 - on)[:, None, :])[:, None]
    kkt = torch.zeros(n, r, g + 1, g + 1, dtype=hess.dtype, device=hess.device)
    kkt[:, :, :g, :g] = block + ridges[:, :, None, None] * eye * on[:, None, :, None]
    kkt[:, :, :g, g] = on[:, None]
    kkt[:, :, g, :g] = on[:, None]
    rhs = torch.cat([-grad * on, torch.zeros(n, 1, dtype=hess.dtype, device=hess.device)], -1)
    return torch.linalg.solve(kkt, rhs[:, None].expand(n, r, g + 1))[..., :g] * on[:, None]


def _search(u, kap, w, noise, dirs, fw):
    """The point of lowest F among: along each direction of dirs [N, R, G], the projected steps 2^-j (weights that
    would turn negative are zeroed and the rest renormalised, so several objectives can leave the face at once) and
    t_max · 2^-j (t_max: where the first weight reaches zero, which it then does exactly); along the Frank–Wolfe
    direction fw, 2^-j. Within rounding of the best F, the full step along dirs[:, 0] (Newton's) wins: F cannot rank
    points that close, and Newton's step is the accurate one."""
    n, r, g = dirs.shape
    rows = torch.arange(n, device=w.device)
    halves = 2.0 ** -torch.arange(_STEPS, dtype=w.dtype, device=w.device)
    ratio = torch.where(dirs < 0, w[:, None] / (-dirs), float("inf"))
    t_max, block = ratio.min(-1)  # [N, R]
    t_max = torch.where(torch.isfinite(t_max), t_max, 1.0)
    ts = torch.cat([halves.expand(n, r, -1), t_max[:, :, None] * halves], -1)  # [N, R, 2S]; the full step first
    cand = w[:, None, None, :] + ts[..., None] * dirs[:, :, None, :]  # [N, R, 2S, G]
    at_max = torch.zeros_like(cand, dtype=torch.bool)
    at_max[:, :, _STEPS].scatter_(-1, block[..., None], True)
    cand = torch.where(at_max | (cand < 0), 0.0, cand).reshape(n, -1, g)
    cand = torch.cat([cand, w[:, None, :] + halves[None, :, None] * fw[:, None, :]], 1)
    cand = cand / cand.sum(-1, keepdim=True)
    fs = _lse(kap[:, None, None] * torch.einsum("nkg,nsg->nsk", u, cand))
    j = fs.argmin(-1)
    j = torch.where(fs[:, 0] <= fs[rows, j] + noise, 0, j)
    return cand[rows, j], fs[rows, j]


def select_block(values: torch.Tensor, weights: torch.Tensor, rule: str = "argmax", kappa: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The block to keep per prompt: argmax_k w·V_k (the paper), or a draw ∝ exp(κ w·V_k) ('sample': the
    best-response policy restricted to the K candidates). The draw runs on the generator's device."""
    check_finite_values(values)
    if not bool(torch.isfinite(weights).all()):
        raise NonFiniteError(f"block weights are not finite: {weights.tolist()}.")
    scores = torch.einsum("nkg,ng->nk", values.double(), weights.double().to(values.device))
    if rule == "argmax":
        return scores.argmax(-1)
    if rule == "sample":
        where = generator.device if generator is not None else scores.device
        probs = torch.softmax(kappa * scores, -1).to(where)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(values.device)
    raise ValueError(f"selection rule {rule!r} is not 'argmax' or 'sample'.")
