"""Compare teacher datasets decoded on the same (held-out) prompts — `evaluation.compare` (per-objective means, worst
cases, win rate vs π_ref with a bootstrap CI, Pareto front, cost) plus, paired by prompt, every method's worst-case
difference vs every other method, with standard errors. Prints JSON (recipes/evaluate.py draws the report).

    python bench/teachers.py --run_dir runs/smollm2-mini-hh --reference eval-pi_ref \\
        --teachers eval-cd_uniform eval-best_of_k eval-cd_maximin eval-rmod-5 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from mocd_train.evaluation import align, compare, paired_comparison  # noqa: E402
from mocd_train.rewards import Normalizer  # noqa: E402


def table(run_dir: Path, name: str) -> list[dict]:
    from datasets import load_from_disk

    return list(load_from_disk(str(run_dir / "teach" / name / "dataset")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/smollm2-mini-hh")
    parser.add_argument("--reference", default="eval-pi_ref")
    parser.add_argument("--teachers", nargs="+", required=True)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    normalizer = Normalizer.load(run_dir / "rollouts" / "normalization.json")
    names = normalizer.objectives

    def norm(rows):
        return normalizer(torch.tensor([[r[f"reward_{g}"] for g in names] for r in rows], dtype=torch.float64))

    tables = {args.reference: table(run_dir, args.reference)} | {t: table(run_dir, t) for t in args.teachers}
    out = compare(tables, args.reference, names, normalizer)
    for name, rows in tables.items():  # every pair of methods, paired by prompt
        out["methods"][name]["vs_others"] = {
            other: paired_comparison(*map(norm, align(rows, other_rows)))
            for other, other_rows in tables.items() if other not in (name, args.reference) and name != args.reference}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
