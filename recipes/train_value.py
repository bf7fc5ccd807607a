"""Stage `value`: the multi-objective value model. The code is `mocd_train.stages.value`; `--help` lists
every key. Run as `python recipes/train_value.py --config <recipe.yaml>` or under `accelerate launch`."""

from mocd_train.cli import run_recipe

if __name__ == "__main__":
    run_recipe("value")
