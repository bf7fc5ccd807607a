"""The Trainer arguments every fine-tuning stage shares (value model, policies, distillation): one builder, so the
stages cannot drift apart."""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path

import torch

from mocd_train.tracking import trainer_report_to


@cache
def _checkpointing_key() -> str:
    """transformers renamed gradient_checkpointing to activation_checkpointing (the old name is a deprecated alias)."""
    from transformers import TrainingArguments  # heavy

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def trainer_args(cfg, out: Path, stage: str, run: str | None = None) -> dict:
    """Keyword arguments for transformers' TrainingArguments or any TRL config: checkpoints under
    <stage dir>/checkpoints every `save_steps` (the resume points), bf16 only on a GPU (TRL defaults to bf16)."""
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    return {"output_dir": str(out / "checkpoints"), "seed": cfg.seed, "learning_rate": cfg.learning_rate,
            "num_train_epochs": cfg.num_train_epochs, "max_steps": getattr(cfg, "max_steps", -1),
            "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "logging_steps": cfg.logging_steps,
            "save_strategy": "steps", "save_steps": cfg.save_steps, "save_total_limit": 2, "use_cpu": cpu,
            "bf16": not cpu and cfg.dtype in ("auto", "bfloat16"), "fp16": not cpu and cfg.dtype == "float16",
            _checkpointing_key(): cfg.gradient_checkpointing, "report_to": trainer_report_to(cfg, stage),
            "run_name": f"{Path(cfg.run_dir).name}-{run or stage}", "remove_unused_columns": False}
