"""Stage `evaluate`: the comparison report. The code is `mocd_train.stages.evaluate`; `--help` lists
every key. Run as `python recipes/evaluate.py --config <recipe.yaml>` or under `accelerate launch`."""

from mocd_train.cli import run_recipe

if __name__ == "__main__":
    run_recipe("evaluate")
