import numpy as np
import pytest
from scipy.optimize import linprog
from scipy.special import softmax

from mocd_train.palette import (
    PaletteError,
    greedy_palette,
    interpolate_palette,
    lp_margin,
    resolve_palette,
    sensitivity,
    solve_palette,
    solve_palettes,
)


def instance(seed, n=400, m=3):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(n, m)) @ rng.normal(size=(m, m))
    q = rng.uniform(0.3, 0.9)
    return r, np.quantile(r, q, axis=0)


def conflicting(seed, n=400):
    """Three objectives that pull against each other, so high palettes are infeasible."""
    cov = np.array([[1.0, -0.6, -0.3], [-0.6, 1.0, -0.2], [-0.3, -0.2, 1.0]])
    return np.random.default_rng(seed).normal(size=(n, 3)) @ np.linalg.cholesky(cov).T


def group_means(r, groups):
    ids = np.unique(groups)
    return np.mean([r[groups == g].mean(0) for g in ids], axis=0)


def full_lp_margin(r, c, groups):
    """The textbook primal over every sample, standardised like the solver: max t s.t. (1/X) Σ_x E_{q_x}[r̃] ≥ c̃ + t
    with one simplex per prompt."""
    mean, std = group_means(r, groups), r.std(0)
    rt, ct = (r - mean) / std, (c - mean) / std
    ids = np.unique(groups)
    n, m = rt.shape
    cost = np.zeros(n + 1)
    cost[-1] = -1.0
    a_ub = np.hstack([-rt.T / len(ids), np.ones((m, 1))])
    a_eq = np.array([np.r_[(groups == g).astype(float), 0.0] for g in ids])
    res = linprog(cost, A_ub=a_ub, b_ub=-ct, A_eq=a_eq, b_eq=np.ones(len(ids)),
                  bounds=[(0, None)] * n + [(None, None)], method="highs")
    return -res.fun


def realized_by_hand(r, lam, groups):
    """E_q[r] with q = per-prompt softmax of λᵀr, every prompt weighted equally."""
    return np.mean([softmax(r[groups == g] @ lam) @ r[groups == g] for g in np.unique(groups)], axis=0)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("grouped", [False, True])
def test_random_instances_meet_kkt_and_the_lp_certificate(seed, grouped):
    r, c = instance(seed)
    groups = np.random.default_rng(seed).integers(0, 80, len(r)) if grouped else None
    sol = solve_palette(r, c, groups)
    g = groups if grouped else np.zeros(len(r), dtype=int)
    t_star = full_lp_margin(r, c, g)
    assert sol.margin == pytest.approx(t_star, abs=1e-7)
    assert sol.feasible == (t_star > 0)
    if not sol.feasible:
        assert np.isnan(sol.lam).all()
        return
    assert sol.converged
    # independent KKT check from λ alone
    realized = realized_by_hand(r, sol.lam, g)
    scale = r.std(0)
    assert np.all(realized >= c - 1e-5 * scale)  # primal feasibility
    assert np.all(sol.lam >= 0)
    active = sol.lam > 0
    np.testing.assert_allclose(realized[active], c[active], atol=1e-5 * scale.max())  # complementary slackness
    np.testing.assert_allclose(sol.realized, realized, rtol=1e-9, atol=1e-9)
    assert 1 <= sol.ess <= len(r) and 1 <= sol.ess_per_prompt


@pytest.mark.parametrize("grouped", [False, True])
def test_cyclic_alignment_reaches_the_same_optimum(grouped):
    r, _ = instance(3, m=4)
    groups = np.arange(len(r)) // 4 if grouped else None
    c = np.quantile(r, 0.6, axis=0)
    a, b = solve_palette(r, c, groups), solve_palette(r, c, groups, method="cyclic")
    assert a.converged and b.converged
    np.testing.assert_allclose(a.realized, b.realized, atol=1e-4 * r.std(0).max())


def test_lambda_is_exactly_zero_when_the_palette_is_below_the_reference():
    r, _ = instance(1)
    c0 = r.mean(0)
    sol = solve_palette(r, c0 - np.array([0.1, 0.0, 0.3]))
    assert sol.feasible and sol.converged and np.all(sol.lam == 0.0)
    # one objective kept, one lowered, one raised: the untouched ones may stay exactly 0
    sol = solve_palette(r, c0 + np.array([0.2 * r[:, 0].std(), -1.0, 0.0]))
    assert sol.lam[0] > 0 and sol.converged


def test_a_target_above_the_sample_maximum_is_infeasible():
    r, c = instance(2)
    c = r.mean(0)
    c[1] = r[:, 1].max() + 1e-3
    sol = solve_palette(r, c)
    assert not sol.feasible and sol.margin < 0 and "auto_adjust" in sol.message


def test_stable_under_scaling_and_shifting():
    r, _ = instance(4)
    c = np.quantile(r, 0.65, axis=0)
    base = solve_palette(r, c)
    scale, shift = np.array([1000.0, 1e-3, 1.0]), np.array([-5e4, 7.0, 1e3])
    moved = solve_palette(r * scale + shift, c * scale + shift)
    assert moved.feasible == base.feasible and moved.converged
    np.testing.assert_allclose(moved.lam * scale, base.lam, rtol=1e-4, atol=1e-8)
    assert moved.margin == pytest.approx(base.margin, abs=1e-9)


def test_interpolation_gives_the_largest_feasible_palette():
    r = conflicting(5)
    c0 = r.mean(0)
    c = np.quantile(r, 0.95, axis=0)
    assert not solve_palette(r, c).feasible
    adjusted, rho = interpolate_palette(r, c)
    assert 0 < rho < 1
    assert solve_palette(r, adjusted).feasible
    assert lp_margin(r, c0 + (rho + 1e-4) * (c - c0)) <= 0  # a step beyond is infeasible


def test_greedy_adjustment_respects_priority():
    r = conflicting(6)
    c0 = r.mean(0)
    c = np.quantile(r, 0.9, axis=0)
    assert not solve_palette(r, c).feasible
    first = greedy_palette(r, c, priority=[2, 0, 1])
    assert solve_palette(r, first).feasible
    share = (first - c0) / (c - c0)
    assert share[2] >= share[0] >= share[1]
    # maximal: raising the last objective that moved at all makes it infeasible
    i = max((j for j in [2, 0, 1] if share[j] > 0), key=[2, 0, 1].index)
    bumped = first.copy()
    bumped[i] += 1e-4 * (c[i] - c0[i])
    assert lp_margin(r, bumped) <= 0


@pytest.mark.parametrize("grouped", [False, True])
def test_sensitivity_predicts_how_lambda_moves(grouped):
    r = conflicting(7)
    groups = np.arange(len(r)) // 8 if grouped else None
    c = np.quantile(r, 0.6, axis=0)
    sol = solve_palette(r, c, groups, tol=1e-9)
    assert np.all(sol.lam > 0)
    dc = 1e-3 * r.std(0)
    moved = solve_palette(r, c + dc, groups, tol=1e-9)
    np.testing.assert_allclose(moved.lam - sol.lam, sensitivity(r, sol.lam, groups) @ dc, rtol=0.05, atol=1e-6)


def test_per_prompt_and_pooled_estimators_differ_when_prompts_differ():
    """Pooling reweights prompts: a prompt whose every sample scores high soaks up weight. Per prompt it cannot."""
    rng = np.random.default_rng(0)
    offsets = np.repeat(rng.normal(size=(50, 2)) * 3, 4, axis=0)  # large between-prompt differences
    r = offsets + rng.normal(size=(200, 2)) * 0.3
    groups = np.arange(200) // 4
    c = group_means(r, groups) + np.array([0.1, 0.0])  # a third of the within-prompt spread
    pooled, per_prompt = solve_palette(r, c), solve_palette(r, c, groups)
    assert per_prompt.feasible and per_prompt.converged
    np.testing.assert_allclose(realized_by_hand(r, per_prompt.lam, groups)[0], c[0], atol=1e-5)
    assert pooled.feasible  # and the pooled λ, applied per prompt (as MAP-D does), falls short of the target
    assert c[0] - realized_by_hand(r, pooled.lam, groups)[0] > 0.05


def test_palette_specs_resolve_against_the_reference():
    r, _ = instance(8)
    names = ["helpful", "harmless", "humor"]
    c = resolve_palette({"helpful": "80%", "harmless": "keep", "humor": {"classifier": 0.5}}, names, r)
    assert c[0] == pytest.approx(np.quantile(r[:, 0], 0.8))
    assert c[1] == pytest.approx(r[:, 1].mean())
    groups = np.arange(len(r)) % 7
    grouped = resolve_palette({"helpful": "80%", "harmless": "keep"}, names, r, groups)
    assert grouped[1] == pytest.approx(group_means(r, groups)[1])
    assert grouped[0] == pytest.approx(np.mean([np.quantile(r[groups == g, 0], 0.8) for g in range(7)]))
    assert c[2] == pytest.approx(r[:, 2].mean() + np.log(1.5))
    assert resolve_palette({"humor": 1.25}, names, r)[2] == 1.25
    np.testing.assert_allclose(resolve_palette({}, names, r), r.mean(0))
    with pytest.raises(PaletteError, match="helpfull"):
        resolve_palette({"helpfull": "80%"}, names, r)
    with pytest.raises(PaletteError, match="quantile"):
        resolve_palette({"helpful": "180%"}, names, r)
    with pytest.raises(PaletteError, match="not a level"):
        resolve_palette({"helpful": "high"}, names, r)


def test_batch_of_palettes_and_bad_input():
    r, _ = instance(9)
    cs = np.quantile(r, [0.5, 0.6, 0.99], axis=0)
    sols = solve_palettes(r, cs)
    assert [s.feasible for s in sols] == [solve_palette(r, c).feasible for c in cs]
    with pytest.raises(PaletteError, match="one level per objective"):
        solve_palette(r, [0.0, 1.0])
    with pytest.raises(PaletteError, match="NaN"):
        solve_palette(np.full((5, 3), np.nan), [0, 0, 0])
