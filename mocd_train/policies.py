"""Per-objective policies through TRL: the datasets and configs TRL trains on, LoRA, and rewarded soups.

Training is TRL's job; this module builds what it needs from a run (preference pairs, prompt/completion data,
reward callables) and checks combinations TRL would only reject at the first step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mocd_train.config import DIVERGENCES, ConfigError
from mocd_train.rewards import Normalizer


def objective_weights(cfg, names: list[str]) -> list[float]:
    """e_g for `objective`, else the given `weights` in objective order (missing ones 0)."""
    if cfg.objective is not None:
        return [1.0 if g == cfg.objective else 0.0 for g in names]
    return [float(cfg.weights.get(g, 0.0)) for g in names]


def _user(prompt: str, system_prompt: str | None) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]


def preference_pairs(rows, names: list[str], normalizer: Normalizer, weights: list[float], margin: float = 0.0,
                     system_prompt: str | None = None) -> tuple[list[dict], dict]:
    """One DPO pair per prompt from its K scored responses: chosen = the highest weighted normalised reward
    w·r̃, rejected = the lowest (the RMOD paper's rule for 4 responses per prompt, with the extremes). Prompts whose
    best and worst differ by ≤ `margin` give no pair. Returns TRL conversational pairs and counts."""
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    w = torch.tensor(weights, dtype=torch.float64)
    pairs, skipped = [], 0
    for group in by_prompt.values():
        raw = torch.tensor([[r[f"reward_{g}"] for g in names] for r in group], dtype=torch.float64)
        score = normalizer(raw) @ w
        best, worst = int(score.argmax()), int(score.argmin())
        if len(group) < 2 or float(score[best] - score[worst]) <= margin:
            skipped += 1
            continue
        pairs.append({"prompt": _user(group[0]["prompt"], system_prompt),
                      "chosen": [{"role": "assistant", "content": group[best]["response"]}],
                      "rejected": [{"role": "assistant", "content": group[worst]["response"]}],
                      "score_margin": float(score[best] - score[worst])})
    if not pairs:
        raise ConfigError(f"no preference pairs: all {skipped} prompts have responses within pair_margin {margin} "
                          "of each other. Roll out more samples per prompt or lower pair_margin.")
    return pairs, {"pairs": len(pairs), "prompts_without_pair": skipped}


def sft_examples(rows, system_prompt: str | None = None) -> list[dict]:
    """(prompt, response) rows → TRL prompt/completion examples (loss on the completion only)."""
    return [{"prompt": _user(r["prompt"], system_prompt), "completion": [{"role": "assistant", "content": r["response"]}]}
            for r in rows]


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")


def common_args(cfg, out: Path) -> dict:
    """TrainingArguments shared by every method (TRL configs default to bf16: only on a GPU here)."""
    from mocd_train.tracking import trainer_report_to

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    return dict(output_dir=str(out / "checkpoints"), seed=cfg.seed, learning_rate=cfg.learning_rate,
                num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
                per_device_train_batch_size=cfg.per_device_train_batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, logging_steps=cfg.logging_steps,
                save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, use_cpu=cpu,
                bf16=not cpu and cfg.dtype in ("auto", "bfloat16"), fp16=not cpu and cfg.dtype == "float16",
                gradient_checkpointing=cfg.gradient_checkpointing, report_to=trainer_report_to(cfg, "policies"),
                run_name=f"{Path(cfg.run_dir).name}-policy", remove_unused_columns=False)


def dpo_trainer(cfg, model, tokenizer, pairs: list[dict], out: Path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common_args(cfg, out), beta=cfg.beta, loss_type=[cfg.loss_type],
                     f_divergence_type=DIVERGENCES[cfg.divergence], f_alpha_divergence_coef=cfg.alpha,
                     max_length=cfg.max_length)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                      peft_config=lora_config(cfg) if cfg.use_lora else None)


def sft_trainer(cfg, model, tokenizer, examples: list[dict], out: Path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common_args(cfg, out), max_length=cfg.max_length, completion_only_loss=True)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                      peft_config=lora_config(cfg) if cfg.use_lora else None)


def reward_callables(reward_set, normalizer: Normalizer, names: list[str], weights: list[float]):
    """GRPO reward functions: one per objective with a non-zero weight, each returning the normalised reward (TRL
    logs them separately), with `weights` as TRL's reward_weights."""
    funcs, used = [], []
    for i, g in enumerate(names):
        if weights[i] == 0:
            continue

        def score(prompts, completions, i=i, **_):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            plain = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
            raw = reward_set.score(plain, texts)
            return normalizer(raw.double())[:, i].tolist()

        score.__name__ = g
        funcs.append(score)
        used.append(weights[i])
    return funcs, used


def grpo_trainer(cfg, model, tokenizer, prompts: list[str], reward_set, normalizer, names, weights, out: Path,
                 system_prompt: str | None = None):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    funcs, used = reward_callables(reward_set, normalizer, names, weights)
    args = GRPOConfig(**common_args(cfg, out), beta=cfg.beta, num_generations=cfg.num_generations,
                      max_completion_length=cfg.max_completion_length, reward_weights=used, temperature=1.0)
    data = Dataset.from_list([{"prompt": _user(p, system_prompt)} for p in prompts])
    return GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tokenizer,
                       peft_config=lora_config(cfg) if cfg.use_lora else None)


def save_policy(trainer, tokenizer, out: Path, merge: bool) -> dict:
    """policies/<name>/adapter (or model, when trained in full) and optionally merged/; temp folder then rename."""
    import os
    import shutil

    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    is_lora = isinstance(model, PeftModel)
    if is_lora and not any(p.numel() for n, p in model.named_parameters() if "lora_" in n):
        raise RuntimeError("the LoRA adapter has no weights to save (ZeRO-3 partitions them): use the ZeRO-2 config "
                           "for LoRA training.")
    saved = {}
    for kind, obj in [("adapter" if is_lora else "model", model)] + ([("merged", None)] if merge and is_lora else []):
        tmp, final = out / f"{kind}.tmp", out / kind
        shutil.rmtree(tmp, ignore_errors=True)
        (obj if obj is not None else model.merge_and_unload()).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        saved[kind] = str(final)
    return saved


def load_policy(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                cache_dir: str | None = None):
    """A policies/<name> folder → (model, tokenizer): merged/ or model/ if saved, else adapter/ merged onto its base."""
    from transformers import AutoModelForCausalLM

    from mocd_train.assets import resolve_model
    from mocd_train.models import load_tokenizer

    path = Path(path)
    full = next((path / sub for sub in ("merged", "model") if (path / sub).is_dir()), None)
    if full is not None:
        model = AutoModelForCausalLM.from_pretrained(full, dtype=dtype)
        return model.to(device).eval(), load_tokenizer(str(full))
    adapter = path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{path} holds no trained policy (no merged/, model/ or adapter/); train one with "
                          "recipes/train_policy.py.")
    from peft import PeftConfig, PeftModel

    base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(resolve_model(base, cache_dir), dtype=dtype)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device).eval(), load_tokenizer(str(adapter))


def soup(adapters: dict[str, str | Path], weights: dict[str, float], out: str | Path, cache_dir: str | None = None):
    """Rewarded soup of LoRA adapters on one base (ALGORITHMS.md §5): ΔW = Σ_i w_i B_i A_i exactly, through PEFT's
    `add_weighted_adapter(combination_type="cat")` ("linear" would mix A and B separately: not the same)."""
    import os
    import shutil

    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from mocd_train.assets import resolve_model
    from mocd_train.models import load_tokenizer

    names = list(adapters)
    if set(weights) != set(names):
        raise ConfigError(f"soup weights name {sorted(weights)}, the adapters are {sorted(names)}.")
    bases = {PeftConfig.from_pretrained(p).base_model_name_or_path for p in adapters.values()}
    if len(bases) != 1:
        raise ConfigError(f"a soup needs adapters of one base model, got {sorted(bases)}.")
    base_path = resolve_model(bases.pop(), cache_dir)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    model.add_weighted_adapter(names, [weights[n] for n in names], "soup", combination_type="cat")
    model.set_adapter("soup")
    merged = model.merge_and_unload(adapter_names=["soup"])
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    load_tokenizer(base_path).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
