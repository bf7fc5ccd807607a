"""Stage `distill`: SFT a student on teacher datasets (completion-only loss; LoRA then merge, or full fine-tuning)
and export one standalone checkpoint that plain `AutoModelForCausalLM.from_pretrained` loads.

    python recipes/distill.py --config recipes/smollm2-mini-hh/pipeline.yaml --teachers "{rmod: 1.0}"
    python recipes/distill.py --config ... --teachers "{rmod: 1.0, mod-0.5: 0.5}" --min_worst_case "25%"
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/distill.py --config ... \
        --use_lora false                                   # full fine-tuning of a larger student

Writes <run_dir>/distill/<name>/student (the checkpoint; with LoRA also adapter/) and DONE.json with the student's
mean log-likelihood of held-out teacher responses before and after training; resumes from its last checkpoint.
"""

import shutil
import time

from mocd_train.cli import run_stage
from mocd_train.data import rollouts_config
from mocd_train.distill import (
    export_student,
    mix_teachers,
    mod_teacher,
    model_card,
    response_logprob,
    split_heldout,
    token_kl_trainer,
)
from mocd_train.models import load_causal_lm, model_source, resolve_device
from mocd_train.policies import completion_examples, sft_trainer
from mocd_train.rewards import Normalizer, parse_objectives
from mocd_train.rundir import stage_dir, teacher_dataset
from mocd_train.stage import Stage


def main(argv=None):
    # parse
    cfg, stage = Stage.open("distill", argv, lambda c: f"distill/{c.name or '-'.join(c.teachers)}")
    names = [s.name for s in parse_objectives(cfg.objectives)]
    name, state, out = cfg.name or "-".join(cfg.teachers), stage.state, stage.dir
    stage.require(rollouts=stage_dir(cfg.run_dir, "rollouts"), student=model_source(cfg.student or cfg.model),
                  **{f"teacher_{t}": teacher_dataset(cfg.run_dir, t).parent for t in cfg.teachers})
    if stage.complete:
        print(f"student {name} already complete: {out}")
        return out

    # load: the teachers' rows, the student
    normalizer = Normalizer.load(stage_dir(cfg.run_dir, "rollouts") / "normalization.json")
    system_prompt = rollouts_config(cfg.run_dir).get("system_prompt")
    rows, stats = mix_teachers(cfg.run_dir, cfg.teachers, names, normalizer, cfg.seed, cfg.deduplicate,
                               cfg.min_worst_case)
    train, held = split_heldout(rows, cfg.heldout_fraction, cfg.seed)
    device = resolve_device(cfg.device, state.device)
    student_name = cfg.student or cfg.model
    from transformers import set_seed

    set_seed(cfg.seed)
    student, tokenizer = load_causal_lm(student_name, device, cfg.dtype, cfg.cache_dir)
    train_examples = completion_examples(train, tokenizer, system_prompt, cfg.max_length)
    held_examples = completion_examples(held, tokenizer, system_prompt, cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    before = response_logprob(student, held_examples, pad_id) if held_examples else None

    # train
    if cfg.loss == "sft":
        trainer = sft_trainer(cfg, student, tokenizer, train_examples, out, "distill")
    else:  # token-level KL to MOD's combined distribution; its policies sit on a second copy of π_ref
        reference, _ = load_causal_lm(cfg.model, device, cfg.dtype, cfg.cache_dir)
        teacher = mod_teacher(cfg.run_dir, next(iter(cfg.teachers)), tokenizer, reference)
        trainer = token_kl_trainer(cfg, student, tokenizer, train_examples, teacher, out)
    stage.start()
    last = stage.last_checkpoint()
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - t0

    # export one standalone checkpoint (main process)
    if state.is_main_process:
        from peft import PeftModel

        model = trainer.accelerator.unwrap_model(trainer.model)
        if isinstance(model, PeftModel):  # the adapter too: small, and the merge can be checked against it
            model.save_pretrained(out / "adapter")
            model = model.merge_and_unload()
        model.eval()
        after = response_logprob(model, held_examples, pad_id) if held_examples else None
        metrics = {"held-out teacher log-likelihood per token (before → after)":
                   f"{before:.3f} → {after:.3f}" if held_examples else "n/a"}
        provenance = {"student": student_name, "teachers": cfg.teachers, "objectives": names, "mix": stats,
                      "teacher_params": _teacher_params(cfg.run_dir, cfg.teachers)}
        path = export_student(model, tokenizer, out / "student",
                              model_card(name, student_name, cfg.teachers, names, stats, metrics), provenance)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        summary = {"student": str(path), "init": student_name, "teachers": cfg.teachers, "loss": cfg.loss, **stats,
                   "train_rows": len(train), "heldout_rows": len(held), "heldout_logprob_before": before,
                   "heldout_logprob_after": after, "train_seconds": seconds, "steps": trainer.state.global_step,
                   "resumed_from": last, "losses": [h["loss"] for h in logs]}
    stage.finish(summary if state.is_main_process else {})
    if state.is_main_process:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        print(f"student {name}: {len(train)} rows, {trainer.state.global_step} steps in {seconds:.0f} s; "
              + "; ".join(f"{k} {v}" for k, v in metrics.items()) + f" → {path}")
    return out


def _teacher_params(run_dir, teachers):
    import json

    out = {}
    for t in teachers:
        done = stage_dir(run_dir, "teach") / t / "DONE.json"
        out[t] = json.loads(done.read_text()).get("params") if done.is_file() else None
    return out


if __name__ == "__main__":
    run_stage(main)
