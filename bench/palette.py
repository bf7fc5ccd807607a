"""MAP palette solver speed; prints JSON. Baselines in the same run: the LP over all n samples solved directly by
HiGHS (what the constraint-generation margin replaces), and the MAP reference code's approach (Adam on the dual for a
fixed 150 steps, feasibility guessed from λ staying finite), with how often that guess disagrees with the LP. Both
estimators are timed: pooled (the paper's: all samples one pool) and grouped per prompt (the default: n/16 prompts
of 16 samples), with their ratio.

    python bench/palette.py [--quick] [--n 10000] [--m 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linprog

sys.path.insert(0, str(Path(__file__).parents[1]))

from mocd_train.palette import lp_margin, solve_palette, solve_palettes  # noqa: E402


def pilot(n: int, m: int, seed: int = 0) -> np.ndarray:
    """Correlated objectives, some pairs in conflict (a random covariance with mixed signs)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, m))
    return rng.normal(size=(n, m)) @ a / np.sqrt(m) + rng.normal(size=m) * 3


def full_lp(r: np.ndarray, c: np.ndarray) -> float:
    mean, std = r.mean(0), r.std(0)
    rt, ct = (r - mean) / std, (c - mean) / std
    n, m = rt.shape
    cost = np.zeros(n + 1)
    cost[-1] = -1.0
    res = linprog(cost, A_ub=np.hstack([-rt.T, np.ones((m, 1))]), b_ub=-ct,
                  A_eq=np.hstack([np.ones((1, n)), [[0.0]]]), b_eq=[1.0], bounds=[(0, None)] * n + [(None, None)],
                  method="highs")
    return -res.fun


def full_lp_grouped(r: np.ndarray, c: np.ndarray, groups: np.ndarray) -> float:
    """t* of the per-prompt estimator as one LP over all samples: max t s.t. (1/X) Σ_j q_j r̃_j ≥ c̃ + t, each prompt's
    q summing to 1 (the dual of the margin's min over μ)."""
    from scipy.sparse import csr_matrix, hstack

    mean, std = r.mean(0), r.std(0)
    rt, ct = (r - mean) / std, (c - mean) / std
    n, m = rt.shape
    x = int(groups.max() + 1)
    cost = np.r_[np.zeros(n), -1.0]
    a_ub = hstack([csr_matrix(-rt.T / x), csr_matrix(np.ones((m, 1)))])
    a_eq = hstack([csr_matrix((np.ones(n), (groups, np.arange(n))), shape=(x, n)), csr_matrix((x, 1))])
    res = linprog(cost, A_ub=a_ub, b_ub=-ct, A_eq=a_eq, b_eq=np.ones(x), bounds=[(0, None)] * n + [(None, None)],
                  method="highs")
    return -res.fun


def adam_guess(r: np.ndarray, c: np.ndarray, steps: int = 150, lr: float = 0.1) -> bool:
    """The reference code's verdict: 'feasible' if λ stays finite after a fixed number of Adam steps."""
    lam, m1, m2 = np.zeros(r.shape[1]), 0.0, 0.0
    for t in range(1, steps + 1):
        z = r @ lam
        q = np.exp(z - z.max())
        q /= q.sum()
        grad = q @ r - c  # gradient of −g
        m1 = 0.9 * m1 + 0.1 * grad
        m2 = 0.999 * m2 + 0.001 * grad**2
        lam = np.maximum(lam - lr * (m1 / (1 - 0.9**t)) / (np.sqrt(m2 / (1 - 0.999**t)) + 1e-8), 0.0)
    return bool(np.isfinite(lam).all() and np.abs(lam).max() < 1e3)


def timed(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="n = 2000, fewer repeats")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--m", type=int, default=10)
    args = parser.parse_args()
    n = 2000 if args.quick else args.n
    r = pilot(n, args.m)
    rng = np.random.default_rng(1)
    # palettes between the 50th and 95th percentile of each objective: a mix of feasible and infeasible ones
    palettes = np.stack([np.array([np.quantile(r[:, i], q) for i, q in enumerate(rng.uniform(0.5, 0.95, args.m))])
                         for _ in range(100)])
    sols = solve_palettes(r, palettes)
    feasible = [s.feasible for s in sols]
    c = palettes[int(np.argmax(feasible))]  # one feasible palette for the single-solve timing
    repeat = 3 if args.quick else 10
    t_batch = time.perf_counter()
    solve_palettes(r, palettes)
    t_batch = (time.perf_counter() - t_batch) * 1000
    sub = palettes[:20]
    lp_full = [full_lp(r, p) for p in sub]
    lp_ours = [lp_margin(r, p) for p in sub]
    adam = [adam_guess((r - r.mean(0)) / r.std(0), (p - r.mean(0)) / r.std(0)) for p in palettes]
    result = {
        "n": n, "m": args.m,
        "ms_per_solve_feasible": timed(lambda: solve_palette(r, c), repeat),
        "ms_per_solve_cyclic": timed(lambda: solve_palette(r, c, method="cyclic"), max(1, repeat // 3)),
        "ms_lp_margin": timed(lambda: lp_margin(r, c), repeat),
        "ms_full_lp_baseline": timed(lambda: full_lp(r, c), max(1, repeat // 3)),
        "ms_batch_100_palettes": t_batch,
        "batch_feasible": int(sum(feasible)),
        "batch_converged": int(sum(s.converged for s in sols if s.feasible)),
        "max_kkt_violation": max(s.kkt_violation for s in sols if s.feasible) if any(feasible) else None,
        "lp_margin_max_abs_diff_vs_full_lp": float(np.max(np.abs(np.array(lp_full) - np.array(lp_ours)))),
        "adam_150_steps_verdict_wrong": int(sum(a != f for a, f in zip(adam, feasible))),
        "adam_150_steps_called_feasible_but_infeasible": int(sum(a and not f for a, f in zip(adam, feasible))),
    }
    result["lp_speedup_vs_full_lp"] = result["ms_full_lp_baseline"] / result["ms_lp_margin"]
    groups = np.arange(n) // 16
    # milder palettes (50th–65th percentiles): most of them are feasible for both estimators
    mild = np.stack([np.array([np.quantile(r[:, i], q) for i, q in enumerate(rng.uniform(0.5, 0.65, args.m))])
                     for _ in range(20)])
    grouped = [p for p, a, b in zip(mild, solve_palettes(r, mild), solve_palettes(r, mild, groups))
               if a.feasible and b.feasible][:5]
    result.update({
        "grouped_prompts": int(groups[-1] + 1),
        "ms_per_solve_pooled": float(np.median([timed(lambda p=p: solve_palette(r, p), repeat) for p in grouped])),
        "ms_per_solve_grouped": float(np.median([timed(lambda p=p: solve_palette(r, p, groups), repeat)
                                                 for p in grouped])),
        "ms_lp_margin_grouped": timed(lambda: lp_margin(r, grouped[0], groups), repeat),
        "grouped_lp_margin_max_abs_diff_vs_full_lp": float(max(abs(full_lp_grouped(r, p, groups)
                                                                   - lp_margin(r, p, groups)) for p in grouped[:2])),
    })
    result["grouped_over_pooled"] = result["ms_per_solve_grouped"] / result["ms_per_solve_pooled"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
