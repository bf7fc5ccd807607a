"""Metrics for comparing methods on the same held-out prompts (ALGORITHMS.md §8). Pure torch on reward tables.

Rewards are normalised with π_ref's rollout statistics before anything is compared across objectives. Standard
errors are over prompts; comparisons between two methods are paired by prompt.
"""

from __future__ import annotations

import math

import torch


def _se(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def method_metrics(norm: torch.Tensor, names: list[str]) -> dict:
    """norm [N, G] normalised rewards of one method → per-objective means, min over objectives of the means (the RMOD
    paper's worst-case reward, with the objective that attains it) and the mean per-prompt worst case."""
    means = norm.mean(0)
    worst = norm.min(1).values
    return {
        "mean": {g: float(m) for g, m in zip(names, means)},
        "mean_se": {g: _se(norm[:, i]) for i, g in enumerate(names)},
        "min_of_means": float(means.min()), "min_of_means_objective": names[int(means.argmin())],
        "mean_worst_case": float(worst.mean()), "mean_worst_case_se": _se(worst),
        "prompts": len(norm),
    }


def paired_comparison(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Method a vs method b on the same prompts (rows aligned): worst-case win rate of a (ties count half) and the
    mean difference of per-prompt worst cases, each with its standard error."""
    wa, wb = a.min(1).values, b.min(1).values
    wins = (wa > wb).double() + 0.5 * (wa == wb).double()
    diff = wa - wb
    return {"worst_case_win_rate": float(wins.mean()), "worst_case_win_rate_se": _se(wins),
            "worst_case_diff": float(diff.mean()), "worst_case_diff_se": _se(diff)}


def align(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows of two methods for the prompts both decoded, in the same order."""
    by_b = {r["prompt_id"]: r for r in rows_b}
    common = [r for r in rows_a if r["prompt_id"] in by_b]
    return common, [by_b[r["prompt_id"]] for r in common]
