"""Stage `policies`: one policy trained by TRL — DPO / f-DPO on preference pairs from the rollouts, GRPO or PPO on the
reward functions, or SFT on (prompt, response) data — for one objective, fixed weights or a MAP palette (MAP-F),
LoRA by default.

    python recipes/train_policy.py --config recipes/smollm2-mini-hh/policies/helpfulness-dpo.yaml
    python recipes/train_policy.py --config ... --method dpo --divergence js --objective harmlessness
    python recipes/train_policy.py --config ... --method grpo --palette hh-65
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/train_policy.py --config ...

Writes <run_dir>/policies/<name>/adapter (+ merged/ with --merge true); resumes from its last checkpoint (PPO: TRL's
experimental PPO trainer cannot resume, so an interrupted PPO run starts over).
"""

import shutil
import time
from pathlib import Path

from datasets import load_from_disk

from mocd_train.assets import load_prompts
from mocd_train.cli import run_stage
from mocd_train.data import load_rollouts, rollouts_config
from mocd_train.models import load_causal_lm, model_source, resolve_device
from mocd_train.palette import load_palette
from mocd_train.policies import (
    completion_examples,
    dpo_trainer,
    fixed_reward,
    grpo_trainer,
    objective_weights,
    ppo_trainer,
    preference_pairs,
    save_policy,
    sft_trainer,
)
from mocd_train.rewards import RewardSet, parse_objectives
from mocd_train.rundir import stage_dir, teacher_dataset
from mocd_train.stage import Stage
from mocd_train.values import check_objectives


def default_name(cfg) -> str:
    """helpfulness-dpo, harmlessness-dpo-js, weighted-helpfulness0.5-harmlessness0.5-grpo, map-f-hh-65-ppo, sft."""
    if cfg.method == "sft":
        return "sft"
    if cfg.palette:
        return f"map-f-{Path(cfg.palette).stem}-{cfg.method}"
    target = cfg.objective or "weighted-" + "-".join(f"{k}{v:g}" for k, v in cfg.weights.items())
    suffix = f"-{cfg.divergence}" if cfg.divergence != "reverse_kl" else ""
    return f"{target}-{cfg.method}{suffix}"


def main(argv=None):
    # parse
    cfg, stage = Stage.open("policies", argv, lambda c: f"policies/{c.name or default_name(c)}")
    names = [s.name for s in parse_objectives(cfg.objectives)]
    name, state, out = cfg.name or default_name(cfg), stage.state, stage.dir
    inputs = {"rollouts": stage_dir(cfg.run_dir, "rollouts"), "model": model_source(cfg.model)}
    if cfg.palette:
        inputs["palette"] = Path(load_palette(cfg.palette, names, cfg.run_dir)["path"]).parent
    if cfg.method == "sft":
        inputs["sft_dataset"] = teacher_dataset(cfg.run_dir, cfg.sft_dataset).parent
    stage.require(**inputs)
    if stage.complete:
        print(f"policy {name} already complete: {out}")
        return out

    # load
    rollouts, normalizer = load_rollouts(cfg.run_dir)
    check_objectives(names, normalizer.objectives, f"the rollouts in {cfg.run_dir}", "Use their objectives.")
    ro = rollouts_config(cfg.run_dir)
    palette = load_palette(cfg.palette, names, cfg.run_dir) if cfg.palette else None
    device = resolve_device(cfg.device, state.device)
    policy, tokenizer = load_causal_lm(cfg.model, device, cfg.dtype, cfg.cache_dir)

    # build the data and the TRL trainer (seeded first: PEFT initialises LoRA before TRL seeds anything)
    from transformers import set_seed

    set_seed(cfg.seed)
    stats = {}
    if cfg.method == "dpo":
        pairs, stats = preference_pairs(rollouts, names, normalizer, objective_weights(cfg, names), cfg.pair_margin,
                                        ro.get("system_prompt"))
        trainer = dpo_trainer(cfg, policy, tokenizer, pairs, out)
    elif cfg.method == "sft":
        rows = list(load_from_disk(str(teacher_dataset(cfg.run_dir, cfg.sft_dataset))))
        trainer = sft_trainer(cfg, policy, tokenizer, completion_examples(rows, tokenizer, ro.get("system_prompt"),
                                                                          cfg.max_length), out)
    else:
        prompts = load_prompts(ro["prompt_sources"], "train", ro["heldout_fraction"], cfg.max_prompts,
                               ro["prompts_file"])
        rewards = RewardSet.from_config(cfg.objectives, device, cfg.cache_dir)
        weights, norm = fixed_reward(cfg, names, normalizer, palette)
        stats = {"reward_weights": weights, "reward_scale": "raw" if norm is None else "normalised"}
        texts = [p.text for p in prompts]
        if cfg.method == "grpo":
            trainer = grpo_trainer(cfg, policy, tokenizer, texts, rewards, norm, names, weights, out,
                                   ro.get("system_prompt"))
        else:
            trainer = ppo_trainer(cfg, policy, tokenizer, texts, rewards, norm, names, weights, out,
                                  ro.get("system_prompt"), state.num_processes)

    # train: from the last checkpoint if there is one
    stage.start()
    last = stage.last_checkpoint()
    t0 = time.perf_counter()
    if cfg.method == "ppo":
        trainer.train()
    else:
        trainer.train(resume_from_checkpoint=last)

    # save + log
    if state.is_main_process:
        saved = save_policy(trainer, tokenizer, out, cfg.merge)
        logs = [h for h in trainer.state.log_history if {"loss", "reward", "objective/scores"} & set(h)]
        summary = {"policy": name, "method": cfg.method, "objective": cfg.objective, "weights": cfg.weights,
                   "palette": cfg.palette, "divergence": cfg.divergence, **saved, **stats,
                   "train_seconds": time.perf_counter() - t0, "steps": trainer.state.global_step,
                   "deepspeed": bool(getattr(trainer, "is_deepspeed_enabled", False)),
                   "resumed_from": last if cfg.method != "ppo" else None,
                   "losses": [h["loss"] for h in logs if "loss" in h],
                   "rewards": [h.get("reward", h.get("objective/scores")) for h in logs
                               if "reward" in h or "objective/scores" in h], "last_logs": logs[-3:]}
    stage.finish(summary if state.is_main_process else {})
    if state.is_main_process:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        print(f"policy {name}: {trainer.state.global_step} steps in {summary['train_seconds']:.0f} s → {out}")
    return out


if __name__ == "__main__":
    run_stage(main)
