"""What each value-training choice buys, on one run's rollouts; prints JSON.

Trains the value model once per configuration below (fixed before any was run; same held-out prompts for all, the
train-side subsets seeded) into <run_dir>/<name>, then reports per objective, at 25 / 50 / 100 % of the response, the
held-out within-prompt pairwise accuracy on pairs whose final normalised rewards differ by ≥ 0.5 (± SE clustered by
prompt, number of pairs), the within-prompt Spearman, and the training cost.

    python bench/value_ablation.py --run_dir runs/vdata [--only paper-small,pairwise]

The rollouts should have ≥ 8 samples per prompt (the configurations subsample them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

COMMON = ["--num_layers", "8", "--learning_rate", "1e-4", "--per_device_train_batch_size", "8",
          "--num_train_epochs", "3", "--heldout_fraction", "0.2", "--report_to", "none"]
SELECT = ["--validation_fraction", "0.15", "--early_stopping_patience", "4", "--save_steps", "50"]
CONFIGS = {
    # the paper's regression on the data size the project used before (192 prompts × 4, of which 80 % trained)
    "paper-small": ["--train_prompts", "154", "--samples_per_prompt", "4", "--save_steps", "100"],
    # the same regression on every training prompt with all 8 samples
    "paper-more-data": ["--save_steps", "100"],
    # + the within-prompt pairwise term
    "pairwise": ["--pairwise_weight", "1.0", "--save_steps", "100"],
    # + checkpoint selection / early stopping on validation pairwise accuracy
    "pairwise-select": ["--pairwise_weight", "1.0", *SELECT],
    # selection alone, to separate its effect from the pairwise term's
    "paper-select": SELECT,
}


def summary(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    done = json.loads((out / "DONE.json").read_text())
    row = {"train_sequences": done["train_sequences"], "train_prompts": done["train_prompts"],
           "steps": done["steps"], "train_seconds": round(done["train_seconds"], 1),
           "selected_checkpoint": done.get("selected_checkpoint"), "final_train_loss": done["train_loss"]}
    for g in [k for k, v in metrics.items() if isinstance(v, dict)]:
        row[g] = {f: {"pair_accuracy": m["within_prompt_pair_accuracy"]["accuracy"],
                      "pair_accuracy_se": m["within_prompt_pair_accuracy"]["se"],
                      "pairs": m["within_prompt_pair_accuracy"]["pairs"],
                      "pair_prompts": m["within_prompt_pair_accuracy"]["prompts"],
                      "within_prompt_spearman": m["within_prompt_spearman"], "pearson": m["pearson"]}
                  for f, m in metrics[g].items() if f in ("25%", "50%", "100%")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--config", default="recipes/smollm2-mini-hh/pipeline.yaml")
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    args = ap.parse_args()
    root = Path(__file__).parents[1]
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    results = {}
    for name in names:
        cmd = [sys.executable, str(root / "recipes" / "train_value.py"), "--config", args.config, "--run_dir",
               args.run_dir, "--name", f"value-{name}", *COMMON, *CONFIGS[name]]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        results[name] = summary(Path(args.run_dir) / f"value-{name}")
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    print(json.dumps({"run_dir": args.run_dir, "configs": {n: CONFIGS[n] for n in names}, "common": COMMON,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
