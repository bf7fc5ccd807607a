"""RMOD's worst-case weight solve over random instances; prints JSON.

Per (G, κ, value scale): batches of 200 prompts with K = 16 candidates, values ~ scale · N(0, 1). For each, the
largest certified gap relative to max(1, |F|), the share of prompts whose certificate meets the tolerance (rtol =
1e-9, below the 1e-8 asked of it), and the median and worst wall time per 200-prompt batch. Beside it, in the same
run, the RMOD paper's update (Eq. 10, 10 steps) on the same batches: its time and how far its F lies above the
exact one. A second table varies K (1, 4, 64) with duplicated candidates and ties at G = 10.

    python bench/weights.py [--quick] [--batches 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from mocd_train.decoding.weights import worst_case_weights  # noqa: E402


def cell(g: int, kappa: float, scale: float, k: int, batches: int, seed: int, hard: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    times, paper_times, rel, conv, excess, iters = [], [], [], 0, [], []
    for _ in range(batches):
        v = torch.randn(200, k, g, generator=gen, dtype=torch.float64) * scale
        if hard:  # duplicated candidates, a duplicated objective and ties
            v[:, k // 2:] = v[:, : k - k // 2]
            v[:, :, -1] = v[:, :, 0]
            v = v.round()
        t0 = time.perf_counter()
        sol = worst_case_weights(v, kappa, on_unconverged="warn")
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        paper = worst_case_weights(v, kappa, method="paper")
        paper_times.append(time.perf_counter() - t0)
        rel.append(float((sol.gap / sol.objective.abs().clamp(min=1)).max()))
        conv += int(sol.converged.sum())
        excess.append(float((paper.objective - sol.objective).max()))
        iters.append(sol.iterations)
    return {"G": g, "kappa": kappa, "scale": scale, "K": k, "instances": 200 * batches,
            "max_relative_gap": max(rel), "converged": conv / (200 * batches),
            "batch_seconds_median": statistics.median(times), "batch_seconds_worst": max(times),
            "iterations_worst": max(iters),
            "paper_batch_seconds_median": statistics.median(paper_times),
            "paper_worst_excess_F": max(excess)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one batch per cell, G ∈ {2, 10} only")
    ap.add_argument("--batches", type=int, default=5, help="200-prompt batches per cell (5 = 1,000 instances)")
    args = ap.parse_args()
    batches = 1 if args.quick else args.batches
    gs = (2, 10) if args.quick else (2, 3, 5, 10)
    rows = []
    for i, g in enumerate(gs):
        for j, kappa in enumerate((0.1, 1.0, 5.0, 20.0, 100.0, 1000.0)):
            for scale in (1.0, 100.0):
                rows.append(cell(g, kappa, scale, 16, batches, seed=1000 * i + 10 * j + int(scale)))
                print(json.dumps(rows[-1]), file=sys.stderr)
    extra = [cell(10, kappa, scale, k, batches, seed=7 + k, hard=True)
             for k in (1, 4, 64) for kappa in (0.0, 20.0, 1000.0) for scale in (1.0, 100.0)]
    at10 = [r for r in rows if r["G"] == 10]
    print(json.dumps({
        "grid": rows, "K_and_ties": extra,
        "summary": {"max_relative_gap": max(r["max_relative_gap"] for r in rows + extra),
                    "converged_share": min(r["converged"] for r in rows + extra),
                    "batch_seconds_median": statistics.median(r["batch_seconds_median"] for r in rows),
                    "batch_seconds_worst": max(r["batch_seconds_worst"] for r in rows),
                    "batch_seconds_worst_G10": max(r["batch_seconds_worst"] for r in at10),
                    "paper_update_worst_excess_F": max(r["paper_worst_excess_F"] for r in rows)},
        "torch_threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
