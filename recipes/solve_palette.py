"""Stage `palette`: a MAP palette's λ and its feasibility certificate.
The code is `mocd_train.stages.palette`; `--help` lists every key.
Run as `python recipes/solve_palette.py --config <recipe.yaml>` or under `accelerate launch`."""

from mocd_train.cli import run_recipe

if __name__ == "__main__":
    run_recipe("palette")
