import pytest
import torch

from mocd_train.evaluation import align, method_metrics, paired_comparison


def test_metrics_by_hand():
    a = torch.tensor([[1.0, -1.0], [0.5, 0.5], [2.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0], [0.5, 0.5], [-1.0, 3.0]], dtype=torch.float64)
    m = method_metrics(a, ["x", "y"])
    assert m["mean"] == {"x": pytest.approx(7 / 6), "y": pytest.approx(-1 / 6)}
    assert m["min_of_means"] == pytest.approx(-1 / 6) and m["min_of_means_objective"] == "y"
    assert m["mean_worst_case"] == pytest.approx((-1 + 0.5 + 0) / 3)
    c = paired_comparison(a, b)
    # per-prompt worst cases: a = (-1, 0.5, 0), b = (0, 0.5, -1): a loses, ties (half), wins
    assert c["worst_case_win_rate"] == pytest.approx(0.5)
    assert c["worst_case_diff"] == pytest.approx(0.0)


def test_align_pairs_rows_by_prompt():
    a = [{"prompt_id": "p1", "v": 1}, {"prompt_id": "p2", "v": 2}, {"prompt_id": "p3", "v": 3}]
    b = [{"prompt_id": "p3", "v": 30}, {"prompt_id": "p1", "v": 10}]
    x, y = align(a, b)
    assert [r["v"] for r in x] == [1, 3] and [r["v"] for r in y] == [10, 30]
