"""Stage `distill`: a student distilled from teacher datasets. The code is `mocd_train.stages.distill`; `--help` lists
every key. Run as `python recipes/distill.py --config <recipe.yaml>` or under `accelerate launch`."""

from mocd_train.cli import run_recipe

if __name__ == "__main__":
    run_recipe("distill")
