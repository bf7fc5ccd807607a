"""Stage `value`: the multi-objective value model V(x, y^t) ∈ R^G, trained on every response prefix of the rollouts.

    python recipes/train_value.py --config recipes/smollm2-mini-hh/pipeline.yaml [--key value ...]
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/train_value.py --config ...

Resumable: a killed run continues from its last checkpoint (value/checkpoints); a complete one is skipped.
Writes value/model (load with `ValueModel.load`), value/metrics.json (held-out MSE, correlations and within-prompt
pairwise accuracy by position). With `validation_fraction` the checkpoint with the best validation pairwise accuracy
is kept; with `pairwise_weight` a within-prompt ranking term joins the paper's regression.
"""

import shutil
from collections import Counter
from functools import partial
from pathlib import Path

from mocd_train.assets import resolve_model
from mocd_train.cli import run_stage
from mocd_train.config import ConfigError
from mocd_train.data import load_rollouts, rollouts_config
from mocd_train.models import load_tokenizer, model_source
from mocd_train.rewards import parse_objectives
from mocd_train.rundir import atomic_write_json, stage_dir
from mocd_train.stage import Stage
from mocd_train.training import trainer_args
from mocd_train.values import (
    BackboneSpec,
    build_value_model,
    check_objectives,
    collate_values,
    prefix_values,
    value_datasets,
    value_metrics,
    value_trainer_class,
)


def main(argv=None):
    # parse
    cfg, stage = Stage.open("value", argv, lambda c: c.name)
    state, out = stage.state, stage.dir
    stage.require(rollouts=stage_dir(cfg.run_dir, "rollouts"), backbone=model_source(cfg.backbone or cfg.model))
    if stage.complete:
        print(f"value model already complete: {out}")
        return out

    # load: the rollouts of this run's π_ref, scored with these objectives
    rollouts, normalizer = load_rollouts(cfg.run_dir)
    rollouts_cfg = rollouts_config(cfg.run_dir)
    names = [s.name for s in parse_objectives(cfg.objectives)]
    check_objectives(names, normalizer.objectives, f"the rollouts in {cfg.run_dir}",
                     "Use the objectives they were scored with, or re-run rollouts with these in another run_dir.")
    if rollouts_cfg["model"] != cfg.model:
        raise ConfigError(f"model: the rollouts in {cfg.run_dir} come from {rollouts_cfg['model']!r}, not "
                          f"{cfg.model!r}; the value model must learn the policy it will decode with.")
    policy_tokenizer = load_tokenizer(resolve_model(cfg.model, cfg.cache_dir))

    # build
    spec = BackboneSpec(cfg.backbone or cfg.model, cfg.init_from, cfg.num_layers, cfg.train_mode)
    lora = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules)
    model, tokenizer = build_value_model(spec, names, normalizer, policy_tokenizer, rollouts_cfg.get("system_prompt"),
                                         lora, cfg.cache_dir)
    train, validation, heldout = value_datasets(rollouts, tokenizer, model.meta, normalizer, cfg.max_length,
                                                cfg.heldout_fraction, cfg.validation_fraction, cfg.train_prompts,
                                                cfg.samples_per_prompt, cfg.seed)
    group = max(Counter(ex["prompt_id"] for ex in train).values())
    if cfg.pairwise_weight > 0 and cfg.per_device_train_batch_size % group:
        raise ConfigError(f"per_device_train_batch_size: {cfg.per_device_train_batch_size} is not a multiple of the "
                          f"{group} samples per prompt; the pairwise term needs whole prompts in a batch.")
    callbacks = []
    if cfg.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = value_trainer_class()(
        model=model, args=training_arguments(cfg, out), train_dataset=_dataset(train),
        eval_dataset=_dataset(validation) if validation else None,
        data_collator=partial(collate_values, pad_id=tokenizer.pad_token_id), callbacks=callbacks,
        pairwise_weight=cfg.pairwise_weight, pair_margin=cfg.pair_margin, selection=validation or None,
        objectives=names)

    # train: from the last checkpoint if there is one
    stage.start()
    last = stage.last_checkpoint()
    result = trainer.train(resume_from_checkpoint=last)

    # evaluate on held-out prompts, save, log
    if state.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        values, targets = prefix_values(model, heldout, tokenizer.pad_token_id, cfg.eval_batch_size)
        metrics = value_metrics(values, targets, names, [ex["prompt_id"] for ex in heldout],
                                pair_margin=cfg.pair_margin)
        model.save(out / "model", tokenizer)
        atomic_write_json(out / "metrics.json", metrics)
        trainer.log({f"heldout/{g}/{f}/{k}": v["accuracy"] if isinstance(v, dict) else v
                     for g in names for f, m in metrics[g].items() for k, v in m.items()})
        tokens = sum(ex["length"] for ex in train) * cfg.num_train_epochs
        summary = {"model": str(out / "model"), "metrics": str(out / "metrics.json"), "train_sequences": len(train),
                   "train_prompts": len({ex["prompt_id"] for ex in train}), "validation_sequences": len(validation),
                   "heldout_sequences": len(heldout), "train_loss": result.training_loss,
                   "selected_checkpoint": trainer.state.best_model_checkpoint and
                   Path(trainer.state.best_model_checkpoint).name,
                   "selection_metric": trainer.state.best_metric, "steps": trainer.state.global_step,
                   "validation_history": [h["eval_pair_accuracy"] for h in trainer.state.log_history
                                          if "eval_pair_accuracy" in h],
                   "train_seconds": result.metrics["train_runtime"],
                   "train_tokens_per_second": tokens / max(result.metrics["train_runtime"], 1e-9),
                   "resumed_from": last, "processes": state.num_processes,
                   "deepspeed": bool(trainer.is_deepspeed_enabled)}
    stage.finish(summary if state.is_main_process else {})
    if state.is_main_process:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # resume points only; the model is saved
        print(f"value model: {len(train)} training / {len(heldout)} held-out sequences, "
              f"{summary['train_tokens_per_second']:.0f} tokens/s → {out / 'model'}")
        for g in names:
            row = "  ".join(f"{f} ρ={m['spearman']:+.2f} ρ_prompt={m['within_prompt_spearman']:+.2f} "
                            f"pairs={m['within_prompt_pair_accuracy']['accuracy']:.2f}"
                            f"±{m['within_prompt_pair_accuracy']['se']:.2f}" for f, m in metrics[g].items())
            print(f"  {g:<14} {row}")
    return out


def training_arguments(cfg, out: Path):
    """The shared Trainer arguments (`training.trainer_args`) plus the value model's: linear warm-up and decay,
    length-grouped batches, and checkpoint selection on the validation prompts when asked."""
    from transformers import TrainingArguments  # heavy

    return TrainingArguments(
        **trainer_args(cfg, out, "value", cfg.name), warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear", eval_strategy="steps" if cfg.validation_fraction else "no",
        eval_steps=cfg.save_steps, load_best_model_at_end=bool(cfg.validation_fraction),
        metric_for_best_model="pair_accuracy", greater_is_better=True, per_device_eval_batch_size=cfg.eval_batch_size,
        train_sampling_strategy="group_by_length", length_column_name="length", dataloader_num_workers=0,
        disable_tqdm=False)


def _dataset(examples):
    from datasets import Dataset

    return Dataset.from_list(examples)


if __name__ == "__main__":
    run_stage(main)
