"""Stage `rollouts`: K responses per prompt from π_ref, scored by every objective.
The code is `mocd_train.stages.rollouts`; `--help` lists every key.
Run as `python recipes/rollouts.py --config <recipe.yaml>` or under `accelerate launch`."""

from mocd_train.cli import run_recipe

if __name__ == "__main__":
    run_recipe("rollouts")
