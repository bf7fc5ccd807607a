"""MAP value palettes (docs/algorithms.md §6): the λ that makes λᵀr one fixed reward reaching every target, or a proof
that no λ can. Pure numpy/scipy: rewards [n, m] of π_ref samples in, λ and its certificates out.

p_λ(y|x) ∝ π_ref(y|x) exp(λᵀr(x, y)) is normalised per prompt. With several samples per prompt (`groups`), the
pilot estimate is q_λ(j) = (1/X) softmax_{j ∈ x}(λᵀr_j): each prompt keeps its weight, which is what MAP-D
(resampling within a prompt) and MAP-F (KL-regularised RL, whose optimum is p_λ) realise. Without groups all samples
form one pool, q_λ(j) ∝ exp(λᵀr_j) — the paper's estimator, which also reweights prompts. The dual
    g(λ) = −(1/X) Σ_x log mean_{j∈x} exp(λᵀr_j) + λᵀc,   λ ≥ 0
is concave with ∇g = c − E_q[r], ∇²g = −Σ_x Cov_{q_x}(r)/X. Feasibility is an LP margin:
    t* = max{t : E_q[r] ≥ c + t·1 for some q with q_x ∈ Δ per prompt} = min_{μ ∈ Δ^m} (1/X) Σ_x max_{j∈x} μᵀ(r_j − c)
t* > 0 ⇔ a finite optimal λ exists; t* ≤ 0 ⇔ the dual is unbounded (or only reached as λ → ∞).
Everything is solved in standardised units (r − c0)/s, so scaling or shifting an objective changes nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linprog, minimize

from mocd_train.errors import ConfigError


class PaletteError(ConfigError):
    """A palette that cannot be read or resolved; the message names the objective and the fix."""


@dataclass
class PaletteSolution:
    lam: np.ndarray  # [m] weights for the raw rewards; NaN when infeasible
    feasible: bool  # decided by the LP margin alone
    margin: float  # t*, in standardised units (share of one reference std)
    realized: np.ndarray  # E_q[r] at lam (raw units); NaN when infeasible
    target: np.ndarray  # c
    reference: np.ndarray  # c0, π_ref's mean on the pilot set
    ess: float  # effective sample size (Σq)²/Σq² of q_λ over all samples
    ess_per_prompt: float  # mean over prompts of the within-prompt ESS (what MAP-D with k samples has to work with)
    converged: bool  # KKT conditions hold to the tolerance
    kkt_violation: float  # largest KKT residual, standardised units
    iterations: int = 0
    message: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, np.ndarray):
                out[k] = [None if math.isnan(x) else float(x) for x in v.tolist()]
            elif isinstance(v, (np.floating, float)):
                out[k] = None if math.isnan(v) else float(v)
        return out


class _Pilot:
    """Standardised rewards r̃ = (r − c0)/s sorted by prompt (λᵀr = λ̃ᵀr̃ + const with λ = λ̃/s, so q is unchanged),
    with the group boundaries for per-prompt softmaxes."""

    def __init__(self, rewards, groups=None):
        raw = _check_rewards(rewards)
        n = len(raw)
        if groups is None:
            order, starts = np.arange(n), np.array([0])
        else:
            groups = np.asarray(groups)
            if groups.shape != (n,):
                raise PaletteError(f"groups must give one prompt id per sample ({n}), got shape {groups.shape}.")
            order = np.argsort(groups, kind="stable")
            starts = np.flatnonzero(np.r_[True, groups[order][1:] != groups[order][:-1]])
        self.order, self.starts = order, starts
        self.sizes = np.diff(np.r_[starts, n])
        self.raw = raw[order]
        self.c0 = raw.mean(0) if groups is None else self.group_mean_of(self.raw)
        s = raw.std(0)
        self.s = np.where(s > 1e-12 * np.maximum(1.0, np.abs(self.c0)), s, 1.0)
        self.r = (self.raw - self.c0) / self.s
        self.num_groups = len(starts)
        self.group_of = np.repeat(np.arange(len(starts)), self.sizes)

    def group_mean_of(self, x: np.ndarray) -> np.ndarray:
        """Mean over prompts of the within-prompt mean (c0 with uniform q)."""
        return (np.add.reduceat(x, self.starts, axis=0) / self.sizes[:, None]).mean(0)

    def target(self, c: np.ndarray) -> np.ndarray:
        return (np.asarray(c, dtype=np.float64) - self.c0) / self.s

    def weights(self, lam_t: np.ndarray) -> tuple[np.ndarray, float]:
        """q_λ over the (sorted) samples, summing to 1, and the mean per-prompt log-mean-exp (for the dual)."""
        z = self.r @ lam_t
        zmax = np.maximum.reduceat(z, self.starts)
        e = np.exp(z - zmax[self.group_of])
        sums = np.add.reduceat(e, self.starts)
        q = e / sums[self.group_of] / self.num_groups
        lme = float(np.mean(zmax + np.log(sums / self.sizes)))
        return q, lme


def _check_rewards(rewards) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 1:
        raise PaletteError(f"rewards must be an array [n samples, m objectives] with n ≥ 2, got shape {r.shape}.")
    if not np.isfinite(r).all():
        raise PaletteError("rewards hold NaN or inf; score the pilot samples again.")
    return r


def _check_palette(palette, m: int) -> np.ndarray:
    c = np.asarray(palette, dtype=np.float64).reshape(-1)
    if c.shape != (m,):
        raise PaletteError(f"palette has {c.size} levels for {m} objectives; give one level per objective.")
    if not np.isfinite(c).all():
        raise PaletteError(f"palette levels must be finite numbers, got {c.tolist()}.")
    return c


# ------------------------------------------------------------------------------------------------- feasibility


def lp_margin(rewards, palette, groups=None) -> float:
    """t* in standardised units (see the module docstring); > 0 means feasible."""
    pilot = _Pilot(rewards, groups)
    return _margin(pilot, pilot.target(_check_palette(palette, pilot.r.shape[1])))


def _margin(pilot: _Pilot, c: np.ndarray) -> float:
    """Exact t* by constraint generation on min_{μ∈Δ} (1/X) Σ_x max_{j∈x} μᵀd_j, d = r̃ − c̃: start from the samples
    that come near their prompt's best under a smoothed minimiser μ̂ (`_smoothed_mu`), solve the LP over those,
    add every sample the LP's μ says beats its prompt's bound, repeat until none does. The answer equals the full
    LP's (checked in tests); the warm start keeps the LPs small (a few rows per prompt, not all of them)."""
    d = pilot.r - c
    score = d @ _smoothed_mu(d, pilot)
    best = np.maximum.reduceat(score, pilot.starts)
    active = score >= best[pilot.group_of] - 0.05
    while True:
        mu, s_x, t = _restricted_lp(d, active, pilot)
        score = d @ mu
        violated = (score > s_x[pilot.group_of] + 1e-10 * max(1.0, abs(t))) & ~active
        if not violated.any():
            return t
        _mark_group_argmax(np.where(violated, score, -np.inf), pilot, active, only_finite=True)


def _smoothed_mu(d: np.ndarray, pilot: _Pilot) -> np.ndarray:
    """A near-minimiser of (1/X) Σ_x max_{j∈x} μᵀd_j over the simplex: L-BFGS on μ = softmax(θ) for the smooth
    upper bound (1/X) Σ_x τ log Σ_{j∈x} exp(μᵀd_j / τ), with τ = 0.05 then 0.005 (standardised units)."""
    m = d.shape[1]

    def value(theta, tau):
        mu = np.exp(theta - theta.max())
        mu /= mu.sum()
        z = d @ mu / tau
        zmax = np.maximum.reduceat(z, pilot.starts)
        e = np.exp(z - zmax[pilot.group_of])
        sums = np.add.reduceat(e, pilot.starts)
        p = e / sums[pilot.group_of]
        g_mu = (p @ d) / pilot.num_groups
        return tau * float(np.mean(zmax + np.log(sums))), mu * (g_mu - mu @ g_mu)

    theta = np.zeros(m)
    for tau in (0.05, 0.005):
        theta = minimize(value, theta, args=(tau,), jac=True, method="L-BFGS-B",
                         options={"maxiter": 200, "gtol": 1e-9}).x
    mu = np.exp(theta - theta.max())
    return mu / mu.sum()


def _mark_group_argmax(x: np.ndarray, pilot: _Pilot, active: np.ndarray, only_finite: bool = False) -> None:
    best = np.maximum.reduceat(x, pilot.starts)
    hit = x >= best[pilot.group_of]
    if only_finite:
        hit &= np.isfinite(x)
    active |= hit


def _restricted_lp(d: np.ndarray, active: np.ndarray, pilot: _Pilot):
    """The LP over the active samples: variables (μ [m], s [X]); minimise mean_x s_x with μᵀd_j ≤ s_{x(j)}."""
    from scipy.sparse import csr_matrix, hstack

    idx = np.flatnonzero(active)
    k, (_, m), x = len(idx), d.shape, pilot.num_groups
    cost = np.r_[np.zeros(m), np.full(x, 1.0 / x)]
    s_part = csr_matrix((-np.ones(k), (np.arange(k), pilot.group_of[idx])), shape=(k, x))
    a_ub = hstack([csr_matrix(d[idx]), s_part]).tocsr()
    a_eq = csr_matrix(np.r_[np.ones(m), np.zeros(x)][None])
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(k), A_eq=a_eq, b_eq=[1.0],
                  bounds=[(0, None)] * m + [(None, None)] * x, method="highs")
    if res.status != 0:
        raise RuntimeError(f"the feasibility LP failed: {res.message}")
    return np.maximum(res.x[:m], 0.0), res.x[m:], float(res.fun)


# ------------------------------------------------------------------------------------------------------- dual


def _dual(lam: np.ndarray, pilot: _Pilot, c: np.ndarray):
    """−g(λ) and its gradient E_q[r̃] − c̃ (standardised units)."""
    q, lme = pilot.weights(lam)
    return lme - lam @ c, q @ pilot.r - c


def _kkt(lam: np.ndarray, pilot: _Pilot, c: np.ndarray) -> float:
    """Largest violation of: E_q r ≥ c, and E_q r_i = c_i wherever λ_i > 0."""
    _, grad = _dual(lam, pilot, c)  # grad = E_q r − c
    return float(max(np.max(np.maximum(-grad, 0.0)), np.max(np.abs(grad[lam > 0]), initial=0.0)))


def solve_palette(rewards, palette, groups=None, *, method: str = "lbfgsb", tol: float = 1e-6,
                  max_iter: int = 2000, margin_tol: float = 1e-9) -> PaletteSolution:
    """λ ≥ 0 such that E_{q_λ}[r] ≥ c with equality where λ_i > 0, or a proof (LP margin ≤ 0) that none exists.

    rewards [n, m] of π_ref samples (the pilot set); palette c [m] in the same units; groups [n] the prompt of each
    sample (None: one pool, as in the MAP paper). `method`: 'lbfgsb' (bound-constrained quasi-Newton on the dual)
    or 'cyclic' (sequential alignment: exact ascent in one λ_i at a time). `tol`: KKT tolerance, standardised."""
    return _solve(_Pilot(rewards, groups), palette, method, tol, max_iter, margin_tol)


def _solve(pilot: _Pilot, palette, method: str, tol: float, max_iter: int, margin_tol: float) -> PaletteSolution:
    c = _check_palette(palette, pilot.r.shape[1])
    ct = pilot.target(c)
    m = len(c)
    margin = _margin(pilot, ct)
    nan = np.full(m, np.nan)
    if margin <= margin_tol:
        return PaletteSolution(nan, False, margin, nan, c, pilot.c0, float("nan"), float("nan"), False, float("nan"),
                               0, "infeasible: no reweighting of the pilot samples reaches every target "
                               f"(LP margin {margin:.3g} ≤ 0); relax it or use auto_adjust.")
    if np.all(ct <= 0):  # c ≤ c0: π_ref already meets it (MAP Theorem 4(ii))
        lam_t, iters = np.zeros(m), 0
    elif method == "lbfgsb":
        lam_t, iters = _lbfgsb(pilot, ct, tol, max_iter)
    elif method == "cyclic":
        lam_t, iters = _cyclic(pilot, ct, tol, max_iter)
    else:
        raise PaletteError(f"method: {method!r} is not 'lbfgsb' or 'cyclic'.")
    violation = _kkt(lam_t, pilot, ct)
    q, _ = pilot.weights(lam_t)
    local = q * pilot.num_groups  # within-prompt softmax
    ess_prompt = float(np.mean(1.0 / np.add.reduceat(local**2, pilot.starts)))
    converged = bool(violation <= tol)
    msg = "feasible" if converged else f"stopped with KKT residual {violation:.2g} > {tol:g}"
    return PaletteSolution(lam_t / pilot.s, True, margin, q @ pilot.raw, c, pilot.c0, float(1.0 / np.sum(q**2)),
                           ess_prompt, converged, violation, iters, msg)


def _lbfgsb(pilot, c, tol, max_iter):
    m = len(c)
    lam, iters = np.zeros(m), 0
    for _ in range(5):  # L-BFGS-B stops on relative criteria; polish until the KKT residual is met
        res = minimize(_dual, lam, args=(pilot, c), jac=True, method="L-BFGS-B", bounds=[(0, None)] * m,
                       options={"maxiter": max_iter, "gtol": tol * 1e-3, "ftol": 1e-15, "maxcor": 20})
        lam, iters = np.maximum(res.x, 0.0), iters + res.nit
        lam[lam < 1e-12] = 0.0
        if _kkt(lam, pilot, c) <= tol:
            break
    return lam, iters


def _cyclic(pilot, c, tol, max_iter):
    """Sequential alignment (MAP Theorem 5): maximise g in one λ_i at a time, cycling through the objectives."""
    lam = np.zeros(len(c))
    for sweep in range(max_iter):
        for i in range(len(c)):
            lam[i] = _coordinate(pilot, c, lam, i)
        if _kkt(lam, pilot, c) <= tol:
            return lam, sweep + 1
    return lam, max_iter


def _coordinate(pilot, c, lam, i) -> float:
    """Solve E_q[r̃_i](λ_i) = c̃_i (increasing in λ_i; Newton safeguarded by bisection), or 0 if already met."""
    trial = lam.copy()

    def mean_var(x):
        trial[i] = x
        q, _ = pilot.weights(trial)
        mean_x = np.add.reduceat(q[:, None] * np.c_[pilot.r[:, i], pilot.r[:, i] ** 2], pilot.starts)
        mean_x *= pilot.num_groups  # within-prompt moments
        return mean_x[:, 0].mean(), (mean_x[:, 1] - mean_x[:, 0] ** 2).mean()

    if mean_var(0.0)[0] >= c[i]:
        return 0.0
    lo, hi = 0.0, 1.0
    while mean_var(hi)[0] < c[i]:
        lo, hi = hi, hi * 2
        if hi > 1e8:
            return hi
    x = 0.5 * (lo + hi)
    for _ in range(200):
        mu, var = mean_var(x)
        if abs(mu - c[i]) < 1e-13:
            break
        lo, hi = (x, hi) if mu < c[i] else (lo, x)
        step = x - (mu - c[i]) / max(var, 1e-300)
        x = step if lo < step < hi else 0.5 * (lo + hi)
    return x


def solve_palettes(rewards, palettes, groups=None, *, method: str = "lbfgsb", tol: float = 1e-6,
                   max_iter: int = 2000, margin_tol: float = 1e-9) -> list[PaletteSolution]:
    """Many palettes [P, m] on one pilot set (standardised and grouped once)."""
    pilot = _Pilot(rewards, groups)
    return [_solve(pilot, c, method, tol, max_iter, margin_tol)
            for c in np.atleast_2d(np.asarray(palettes, dtype=np.float64))]


# ------------------------------------------------------------------------------------------------ adjustments


def interpolate_palette(rewards, palette, groups=None, tol: float = 1e-6) -> tuple[np.ndarray, float]:
    """MAP Alg. 2: c' = c0 + ρ(c − c0) with the largest feasible ρ ∈ [0, 1] (bisection on the LP margin, which is
    concave in ρ, so the feasible ρ form an interval). Returns (c', ρ); ρ = 1 when c is already feasible."""
    pilot = _Pilot(rewards, groups)
    c = _check_palette(palette, pilot.r.shape[1])
    ct = pilot.target(c)
    rho = _largest_feasible(lambda x: _margin(pilot, x * ct), tol)
    return pilot.c0 + rho * (c - pilot.c0), rho


def greedy_palette(rewards, palette, priority: list[int] | None = None, groups=None, tol: float = 1e-6) -> np.ndarray:
    """MAP Alg. 3: objectives in priority order each take the largest feasible share of their raise over c0, the
    ones before them held at what they got and the ones after at c0 ('keep')."""
    pilot = _Pilot(rewards, groups)
    c = _check_palette(palette, pilot.r.shape[1])
    ct = pilot.target(c)
    m = len(c)
    order = list(range(m)) if priority is None else list(priority)
    if sorted(order) != list(range(m)):
        raise PaletteError(f"priority must order every objective index 0..{m - 1} once, got {order}.")
    cur = np.minimum(ct, 0.0)  # lowering a level never hurts feasibility
    for i in order:
        if ct[i] <= 0:
            continue

        def margin(x, i=i):
            trial = cur.copy()
            trial[i] = x * ct[i]
            return _margin(pilot, trial)

        cur[i] = _largest_feasible(margin, tol) * ct[i]
    return pilot.c0 + cur * pilot.s


def _largest_feasible(margin, tol: float) -> float:
    """Largest x in [0, 1] with margin(x) > 0, for margin concave in x and margin(0) > 0 (else 0)."""
    if margin(1.0) > 0:
        return 1.0
    if margin(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if margin(mid) > 0 else (lo, mid)
    return lo


def sensitivity(rewards, lam, groups=None) -> np.ndarray:
    """∂λ/∂c = H⁻¹ with H = (1/X) Σ_x Cov_{q_x}(r) (implicit function theorem on E_{q_λ}[r] = c; exact where every
    λ_i > 0): how much each weight must move per unit raise of each target, raw units."""
    pilot = _Pilot(rewards, groups)
    lam_t = np.asarray(lam, dtype=np.float64) * pilot.s
    q, _ = pilot.weights(lam_t)
    local_mean = np.add.reduceat(q[:, None] * pilot.raw, pilot.starts) * pilot.num_groups  # [X, m]
    dev = pilot.raw - local_mean[pilot.group_of]
    return np.linalg.pinv(dev.T @ (dev * q[:, None]))


# ------------------------------------------------------------------------------------------------ palette specs

_QUANTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def resolve_palette(spec: dict, objectives: list[str], rewards, groups=None) -> np.ndarray:
    """Per-objective palette spec → levels c [m], against the reference samples.

    Each objective takes one of: a number (raw units); "80%" (that quantile of π_ref's rewards); "keep" (c0, π_ref's
    mean: no change asked); {classifier: κ} or "classifier:κ" (c0 + log(1 + κ), for rewards that are a
    classifier's log-probability: MAP's "κ more likely"). Objectives left out are kept at c0.
    With `groups` (samples per prompt), a quantile is taken within each prompt and averaged: "as good as π_ref's
    80th-percentile answer to the same prompt". The pooled quantile mixes in how rewards differ between prompts,
    which no policy can change, so per prompt it is often out of reach."""
    r = _check_rewards(rewards)
    if len(objectives) != r.shape[1]:
        raise PaletteError(f"{len(objectives)} objective names for rewards with {r.shape[1]} columns.")
    unknown = set(spec) - set(objectives)
    if unknown:
        raise PaletteError(f"palette names {sorted(unknown)}, which are not objectives of these rewards "
                           f"({objectives}). Use those names.")
    pilot = _Pilot(r, groups)
    columns = np.split(pilot.raw, pilot.starts[1:]) if groups is not None else [r]
    c = pilot.c0.copy()
    for i, name in enumerate(objectives):
        if name in spec:
            c[i] = _level(name, spec[name], [col[:, i] for col in columns], pilot.c0[i])
    return c


def _level(name: str, value, columns: list[np.ndarray], c0: float) -> float:
    if isinstance(value, bool):
        raise PaletteError(f"palette.{name}: {value!r} is not a level.")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict) and set(value) == {"classifier"}:
        value = f"classifier:{value['classifier']}"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "keep":
            return float(c0)
        if (mq := _QUANTILE.match(text)) is not None:
            p = float(mq.group(1))
            if not 0 <= p <= 100:
                raise PaletteError(f"palette.{name}: quantile {value!r} must lie in 0%..100%.")
            return float(np.mean([np.quantile(col, p / 100) for col in columns]))
        if text.startswith("classifier:"):
            kappa = float(text.split(":", 1)[1])
            if kappa <= -1:
                raise PaletteError(f"palette.{name}: κ must be > −1 (log(1 + κ)), got {kappa}.")
            return float(c0 + math.log1p(kappa))
    raise PaletteError(f"palette.{name}: {value!r} is not a level. Use a number, a quantile like '80%', 'keep', "
                       "or {classifier: κ}.")


PALETTE_FILE = "palette.json"  # inside the stage folder <run_dir>/palette/<name>/


def load_palette(palette: str | Path, objectives: list[str], run_dir: str | Path | None = None) -> dict:
    """A solved palette — a name under <run_dir>/palette, a palette folder or a .json file — refusing infeasible ones
    and ones for other objectives; `path` in the record says which file it was."""
    path = Path(palette)
    if path.suffix != ".json":
        folder = path if path.is_dir() or run_dir is None else Path(run_dir) / "palette" / str(palette)
        path = folder / PALETTE_FILE
    if not path.is_file():
        raise PaletteError(f"palette: {str(path)!r} does not exist. Solve one with recipes/solve_palette.py first.")
    record = json.loads(path.read_text())
    if record["objectives"] != list(objectives):
        raise PaletteError(f"palette {path} is for objectives {record['objectives']}, this run has {objectives}.")
    if not record["feasible"]:
        raise PaletteError(f"palette {path} is infeasible (LP margin {record['margin']:+.4f}); re-solve it with "
                          "--auto_adjust interpolate.")
    lam = record.get("lam")
    if not isinstance(lam, list) or len(lam) != len(objectives) or not all(
            isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in lam):
        raise PaletteError(f"palette {path}: λ = {lam} is not {len(objectives)} finite numbers ≥ 0; the file is "
                           "damaged or was edited by hand. Solve the palette again.")
    return {**record, "path": str(path)}


__all__ = ["PaletteError", "PaletteSolution", "solve_palette", "solve_palettes", "lp_margin", "interpolate_palette",
           "greedy_palette", "sensitivity", "resolve_palette", "load_palette"]
