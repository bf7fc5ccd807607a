"""Stage `pipeline`: every step of a pipeline file, in order. The code is `mocd_train.stages.pipeline`; `--help` lists
every key. Run as `python recipes/pipeline.py --config <recipe.yaml>` or under `accelerate launch`."""

from mocd_train.cli import run_recipe

if __name__ == "__main__":
    run_recipe("pipeline")
