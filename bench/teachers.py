"""Compare teacher datasets decoded on the same (held-out) prompts: per-objective normalised means, min over
objectives of the means, mean per-prompt worst case, and — paired by prompt — each method's worst-case win rate
vs π_ref and its worst-case difference vs the other methods, with standard errors. Prints JSON.

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

from mocd_train.evaluation import align, method_metrics, paired_comparison  # noqa: E402
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

    ref_rows = table(run_dir, args.reference)
    methods = {args.reference: ref_rows} | {t: table(run_dir, t) for t in args.teachers}
    out = {"objectives": names, "reference": args.reference, "methods": {}}
    for name, rows in methods.items():
        a, b = align(rows, ref_rows)
        entry = method_metrics(norm(a), names)
        if name != args.reference:
            entry["vs_reference"] = paired_comparison(norm(a), norm(b))
            entry["vs_others"] = {}
            for other, other_rows in methods.items():
                if other not in (name, args.reference):
                    x, y = align(rows, other_rows)
                    entry["vs_others"][other] = paired_comparison(norm(x), norm(y))
        entry["policy_tokens_per_prompt"] = sum(r["cost_policy_tokens"] for r in a) / len(a)
        out["methods"][name] = entry
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
