"""Stage `teach`: a decoding-time teacher's dataset. The code is `mocd_train.stages.teach`; `--help` lists
every key. Run as `python recipes/teach.py --config <recipe.yaml>` or under `accelerate launch`."""

from mocd_train.cli import run_recipe

if __name__ == "__main__":
    run_recipe("teach")
