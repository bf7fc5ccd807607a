import math
import warnings

import mpmath
import numpy as np
import pytest
import torch

from mocd_train.decoding.weights import (
    check_finite_values,
    fw_gap,
    objective,
    select_block,
    worst_case_weights,
)
from mocd_train.errors import NonFiniteError, WeightSolveError


def grid_minimum(v, kappa, steps):
    """F on a fine grid of the simplex (G = 2 or 3): an independent reference for the optimum."""
    g = v.shape[-1]
    ticks = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if g == 2:
        w = torch.stack([ticks, 1 - ticks], -1)
    else:
        a, b = torch.meshgrid(ticks, ticks, indexing="ij")
        keep = (a + b) <= 1 + 1e-12
        w = torch.stack([a[keep], b[keep], (1 - a[keep] - b[keep]).clamp(min=0)], -1)
    vals = objective(v.double().expand(len(w), -1, -1), w, torch.full((len(w),), float(kappa), dtype=torch.float64))
    return vals.min().item()


def mp_bound(v: np.ndarray, w: np.ndarray, kappa: float) -> tuple[float, float]:
    """(F(w), an upper bound on F(w) − F(w*)) in 60-digit arithmetic, from code independent of the solver's: the
    duality gap F(w) − D(q) at the better of q(w) and a dual point polished here with numpy's least squares
    (D(q) = κ min_g (Vᵀq)_g − KL(q ‖ uniform) ≤ F(w*) for every q in the simplex: weak duality)."""
    mpmath.mp.dps = 60
    k, g = v.shape
    V = [[mpmath.mpf(float(x)) for x in row] for row in v]
    W = [mpmath.mpf(float(x)) for x in w]
    kap = mpmath.mpf(kappa)
    z = [kap * mpmath.fsum(W[j] * V[i][j] for j in range(g)) for i in range(k)]
    top = max(z)
    e = [mpmath.exp(x - top) for x in z]
    total = mpmath.fsum(e)
    q = [x / total for x in e]
    f = top + mpmath.log(total) - mpmath.log(k)

    def dual(qq):
        m = [mpmath.fsum(qq[i] * V[i][j] for i in range(k)) for j in range(g)]
        kl = mpmath.fsum(x * mpmath.log(k * x) for x in qq if x > 0)
        return kap * min(m) - kl

    best = dual(q)
    qf = np.array([float(x) for x in q])
    m = qf @ v
    on = w > 0
    cov = ((v - m) * qf[:, None]).T @ (v - m)
    lhs = np.c_[cov[np.ix_(on, on)], -np.ones(on.sum())]
    a = np.zeros(g)
    a[on] = np.linalg.lstsq(lhs, -m[on], rcond=None)[0][: on.sum()]
    polished = qf * (1 + (v - m) @ a)
    if (polished >= 0).all():
        polished = [mpmath.mpf(float(x)) for x in polished / polished.sum()]
        best = max(best, dual(polished))
    return float(f), float(f - best)


HARD = [  # (G, K, κ, scale, kind)
    (2, 16, 1000.0, 100.0, "plain"), (3, 4, 20.0, 1.0, "plain"), (5, 16, 100.0, 100.0, "plain"),
    (10, 16, 1000.0, 100.0, "plain"), (10, 64, 20.0, 1e4, "plain"), (10, 4, 5.0, 1.0, "ties"),
    (5, 16, 1000.0, 1.0, "duplicates"), (10, 16, 0.1, 100.0, "offset"), (3, 1, 50.0, 1.0, "plain"),
    (10, 16, 0.0, 1.0, "plain"), (12, 32, 1000.0, 1e4, "plain"),
]


@pytest.mark.parametrize("g,k,kappa,scale,kind", HARD)
def test_certificate_holds_in_high_precision(g, k, kappa, scale, kind):
    """Every returned w is optimal to 1e-8 · max(1, |F|), checked by an independent 60-digit duality gap."""
    gen = torch.Generator().manual_seed(g * 1000 + k + int(kappa))
    v = torch.randn(12, k, g, generator=gen, dtype=torch.float64) * scale
    if kind == "ties":
        v = v.round()
    elif kind == "duplicates":  # repeated candidates and an objective repeated twice
        v[:, k // 2:] = v[:, : k - k // 2]
        v[:, :, 1] = v[:, :, 0]
    elif kind == "offset":  # raw rewards far from zero
        v = v + 1e4
    sol = worst_case_weights(v, kappa)
    assert torch.all(sol.weights >= 0)
    torch.testing.assert_close(sol.weights.sum(-1), torch.ones(12, dtype=torch.float64), atol=1e-12, rtol=0)
    assert bool(sol.converged.all())
    for i in range(12):
        f, bound = mp_bound(v[i].numpy(), sol.weights[i].numpy(), kappa)
        assert bound <= 1e-8 * max(1.0, abs(f)), (i, bound, f)
        assert abs(f - float(sol.objective[i])) <= 1e-9 * max(1.0, abs(f))


@pytest.mark.parametrize("g,steps", [(2, 20000), (3, 600)])
@pytest.mark.parametrize("kappa", [0.1, 1.0, 5.0, 20.0])
def test_weights_reach_the_grid_optimum_and_its_kkt_structure(g, steps, kappa):
    torch.manual_seed(g * 100 + int(kappa * 10))
    v = torch.randn(6, 8, g)
    sol = worst_case_weights(v, kappa)
    for i in range(6):
        assert sol.objective[i].item() <= grid_minimum(v[i : i + 1], kappa, steps) + 1e-9
        # KKT: objectives holding weight share the same expected value under q; the others' are larger
        z = kappa * (v[i].double() @ sol.weights[i])
        m = torch.softmax(z, 0) @ v[i].double()
        support = sol.weights[i] > 0
        assert (m[support].max() - m[support].min()).item() <= 1e-9
        assert torch.all(m[~support] >= m[support].max() - 1e-9)


def test_degenerate_cases_have_their_documented_answers():
    """κ = 0 and K = 1 (or identical candidates): the vertex of the objective with the lowest mean, ties → lowest."""
    v = torch.tensor([[[1.0, 0.5, 0.5], [0.0, 0.5, 0.5]]])  # means 0.5, 0.5, 0.5: a three-way tie
    assert worst_case_weights(v, 0.0).weights.tolist() == [[1.0, 0.0, 0.0]]
    v = torch.tensor([[[2.0, -1.0, 3.0]], [[0.0, 4.0, 0.0]]])  # K = 1
    sol = worst_case_weights(v, 5.0)
    assert sol.weights.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]] and torch.all(sol.gap == 0)
    same = v[:1].expand(1, 6, 3)  # six identical candidates behave like one
    assert worst_case_weights(same, 5.0).weights.tolist() == [[0.0, 1.0, 0.0]]
    assert worst_case_weights(torch.full((2, 4, 3), 7.0), 9.0).weights.tolist() == [[1.0, 0, 0]] * 2
    assert worst_case_weights(torch.randn(3, 5, 1), 2.0).weights.tolist() == [[1.0]] * 3


def test_small_kappa_puts_all_weight_on_the_objective_with_the_lowest_mean_value():
    """F(w) ≈ κ w·mean_k V_k for small κ: linear, so w* is the vertex of the worst objective on average (not uniform).
    Large κ approaches minimax over candidates and mixes objectives."""
    torch.manual_seed(0)
    v = torch.randn(500, 16, 2)
    worst = v.mean(1).argmin(-1)
    small = worst_case_weights(v, 1e-4)
    assert torch.equal(small.weights.argmax(-1), worst) and torch.all(small.weights.max(-1).values == 1.0)
    big = worst_case_weights(v, 50.0)
    assert ((big.weights > 0) & (big.weights < 1)).all(-1).double().mean() > 0.8


def test_shifting_every_value_shifts_F_only():
    torch.manual_seed(3)
    v = torch.randn(40, 16, 5, dtype=torch.float64) * 10
    a, b = worst_case_weights(v, 20.0), worst_case_weights(v + 1234.5, 20.0)
    torch.testing.assert_close(b.objective, a.objective + 20.0 * 1234.5, atol=1e-6, rtol=0)
    assert (a.weights - b.weights).abs().max() < 1e-6


def test_paper_update_is_an_option_and_lands_elsewhere():
    torch.manual_seed(1)
    v = torch.randn(64, 16, 3)
    exact, paper = worst_case_weights(v, 5.0), worst_case_weights(v, 5.0, method="paper")
    assert paper.iterations == 10
    assert torch.all(paper.objective >= exact.objective - 1e-9)  # never better than the optimum
    assert (paper.weights - exact.weights).abs().sum(-1).median() > 0.05
    assert torch.all(fw_gap(v.double(), exact.weights, torch.full((64,), 5.0, dtype=torch.float64)) <= 1e-8)
    big = worst_case_weights(torch.randn(8, 16, 3) * 100, 50.0, method="paper")  # no 0/0 where exp underflows
    assert torch.isfinite(big.weights).all()


def test_batched_solution_equals_per_prompt_solutions():
    torch.manual_seed(2)
    v = torch.randn(5, 4, 3)
    kappa = torch.tensor([0.5, 1.0, 2.0, 5.0, 10.0])
    batch = worst_case_weights(v, kappa)
    for i in range(5):
        one = worst_case_weights(v[i : i + 1], kappa[i])
        assert (one.objective - batch.objective[i]).abs().item() < 1e-8


def test_an_unconverged_solve_is_never_silent():
    torch.manual_seed(4)
    v = torch.randn(6, 16, 10) * 100
    with pytest.raises(WeightSolveError, match="did not converge") as err:
        worst_case_weights(v, 1000.0, max_iter=2)
    assert err.value.rows
    with pytest.warns(UserWarning, match="did not converge"):
        sol = worst_case_weights(v, 1000.0, max_iter=2, on_unconverged="warn")
    assert not bool(sol.converged.all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_and_kappa_are_refused(bad):
    v = torch.randn(3, 4, 2)
    v[1, 2, 1] = bad
    with pytest.raises(NonFiniteError, match="row 1, candidate 2, objective 1"):
        worst_case_weights(v, 1.0)
    with pytest.raises(NonFiniteError, match="prompt 'p1', block 3, candidate 2, harmlessness"):
        check_finite_values(v, "values", rows=["prompt 'p0', block 3", "prompt 'p1', block 3"],
                            objectives=["helpfulness", "harmlessness"])
    with pytest.raises(NonFiniteError):
        select_block(v, torch.full((3, 2), 0.5))
    good = torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="finite number"):
        worst_case_weights(good, bad)
    with pytest.raises(NonFiniteError, match="weights"):
        select_block(good, torch.tensor([[0.5, bad]] * 3))
    with pytest.raises(ValueError, match="≥ 0"):
        worst_case_weights(good, -1.0)


def test_block_selection_rules():
    v = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.4, 0.4]]])
    assert select_block(v, torch.tensor([[1.0, 0.0]])).item() == 1
    assert select_block(v, torch.tensor([[0.5, 0.5]])).item() in (0, 1)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([select_block(v, torch.tensor([[1.0, 0.0]]), "sample", 3.0, g) for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=3).double() / 3000
    expected = torch.softmax(3.0 * torch.tensor([0.0, 1.0, 0.4], dtype=torch.float64), 0)
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


def test_solve_is_quiet_on_a_decoding_sized_batch():
    """The decoders' case (K = 4, G = 2, normalised values) converges without warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = worst_case_weights(torch.randn(64, 4, 2), 5.0)
    assert bool(sol.converged.all()) and math.isfinite(float(sol.gap.max()))
