"""Stage `policies`: a policy trained with TRL (SFT, DPO, f-DPO, GRPO, PPO, MAP-F).
The code is `mocd_train.stages.policies`; `--help` lists every key.
Run as `python recipes/train_policy.py --config <recipe.yaml>` or under `accelerate launch`."""

from mocd_train.cli import run_recipe

if __name__ == "__main__":
    run_recipe("policies")
