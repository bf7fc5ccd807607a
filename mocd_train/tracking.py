"""Experiment tracking: W&B, offline by default (no machine here reaches its server; `wandb sync` uploads later)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mocd_train.config import to_dict


def start_run(cfg: Any, stage: str, is_main: bool = True):
    """A W&B run in `<run_dir>/wandb`, grouped by run; None when tracking is off or on non-main processes."""
    if cfg.report_to != "wandb" or not is_main:
        return None
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "mocd_train"), group=run_dir.name, job_type=stage,
                      name=f"{run_dir.name}-{stage}", dir=str(run_dir), config=to_dict(cfg))


def trainer_report_to(cfg: Any, stage: str) -> str:
    """`report_to` for a transformers/TRL trainer, with W&B pointed at the run directory like `start_run`."""
    if cfg.report_to != "wandb":
        return "none"
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "mocd_train"}.items():
        os.environ.setdefault(key, value)
    os.environ.update(WANDB_DIR=str(run_dir), WANDB_RUN_GROUP=run_dir.name, WANDB_JOB_TYPE=stage)
    return "wandb"
