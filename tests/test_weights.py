import pytest
import torch

from mocd_train.decoding.weights import (
    fw_gap,
    objective,
    select_block,
    worst_case_weights,
)


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


@pytest.mark.parametrize("g,steps", [(2, 20000), (3, 600)])
@pytest.mark.parametrize("kappa", [0.1, 1.0, 5.0, 20.0])
def test_weights_reach_the_optimum_and_its_kkt_structure(g, steps, kappa):
    torch.manual_seed(g * 100 + int(kappa * 10))
    v = torch.randn(6, 8, g)
    sol = worst_case_weights(v, kappa)
    assert torch.all(sol.weights >= 0) and torch.allclose(sol.weights.sum(-1), torch.ones(6, dtype=torch.float64))
    assert torch.all(sol.gap <= 1e-6)  # certificate: F(w) − F(w*) ≤ gap
    for i in range(6):
        assert sol.objective[i].item() <= grid_minimum(v[i : i + 1], kappa, steps) + 1e-6
        # KKT: objectives holding weight share the same expected value under q; the others' are larger
        z = kappa * (v[i].double() @ sol.weights[i])
        m = torch.softmax(z, 0) @ v[i].double()
        support = sol.weights[i] > 1e-9
        assert (m[support].max() - m[support].min()).item() <= 1e-5
        assert torch.all(m[~support] >= m[support].max() - 1e-5)


def test_small_kappa_puts_all_weight_on_the_objective_with_the_lowest_mean_value():
    """F(w) ≈ κ w·mean_k V_k for small κ: linear, so w* is the vertex of the worst objective on average (ALGORITHMS.md
    says 'near uniform'; that is wrong). Large κ approaches minimax over candidates and mixes objectives."""
    torch.manual_seed(0)
    v = torch.randn(500, 16, 2)
    worst = v.mean(1).argmin(-1)
    small = worst_case_weights(v, 1e-4)
    assert torch.equal(small.weights.argmax(-1), worst) and torch.all(small.weights.max(-1).values == 1.0)
    big = worst_case_weights(v, 50.0)
    assert ((big.weights > 0) & (big.weights < 1)).all(-1).double().mean() > 0.8


def test_paper_update_is_an_option_and_lands_elsewhere():
    torch.manual_seed(1)
    v = torch.randn(64, 16, 3)
    exact, paper = worst_case_weights(v, 5.0), worst_case_weights(v, 5.0, method="paper")
    assert paper.iterations == 10
    assert torch.all(paper.objective >= exact.objective - 1e-9)  # never better than the optimum
    assert (paper.weights - exact.weights).abs().sum(-1).median() > 0.05
    assert torch.all(fw_gap(v.double(), exact.weights, torch.full((64,), 5.0, dtype=torch.float64)) <= 1e-6)


def test_batched_solution_equals_per_prompt_solutions():
    torch.manual_seed(2)
    v = torch.randn(5, 4, 3)
    kappa = torch.tensor([0.5, 1.0, 2.0, 5.0, 10.0])
    batch = worst_case_weights(v, kappa)
    for i in range(5):
        one = worst_case_weights(v[i : i + 1], kappa[i])
        assert (one.objective - batch.objective[i]).abs().item() < 1e-8


def test_block_selection_rules():
    v = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.4, 0.4]]])
    assert select_block(v, torch.tensor([[1.0, 0.0]])).item() == 1
    assert select_block(v, torch.tensor([[0.5, 0.5]])).item() in (0, 1)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([select_block(v, torch.tensor([[1.0, 0.0]]), "sample", 3.0, g) for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=3).double() / 3000
    expected = torch.softmax(3.0 * torch.tensor([0.0, 1.0, 0.4], dtype=torch.float64), 0)
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)
