"""Per-objective policies through TRL: the datasets and configs TRL trains on, LoRA, and rewarded soups.

Training is TRL's job; this module builds what it needs from a run (preference pairs, prompt/completion data,
reward callables) and checks combinations TRL would only reject at the first step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mocd_train.assets import resolve_model
from mocd_train.atomic import atomic_dir
from mocd_train.config import DIVERGENCES
from mocd_train.data import chat_texts
from mocd_train.errors import ConfigError
from mocd_train.models import adapter_base, load_tokenizer
from mocd_train.rewards import Normalizer
from mocd_train.training import trainer_args


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
                      "chosen_finished": bool(group[best].get("finished", True)),
                      "rejected_finished": bool(group[worst].get("finished", True)),
                      "score_margin": float(score[best] - score[worst])})
    if not pairs:
        raise ConfigError(f"no preference pairs: all {skipped} prompts have responses within pair_margin {margin} "
                          "of each other. Roll out more samples per prompt or lower pair_margin.")
    return pairs, {"pairs": len(pairs), "prompts_without_pair": skipped}


def completion_examples(rows, tokenizer, system_prompt: str | None = None,
                        max_length: int | None = None) -> list[dict]:
    """(prompt, response) rows → token ids and a `completion_mask` (the tokens with a loss), for SFT and
    distillation: the chat-formatted prompt, the response's own token ids when they are this tokenizer's (nothing
    re-tokenised differently), then EOS only where the response finished. A response cut at max_new_tokens must
    not teach the model to stop mid-sentence, as the chat template's closing tag after every answer would."""

    out = []
    for r in rows:
        prompt = tokenizer(chat_texts(tokenizer, [r["prompt"]], system_prompt)[0],
                           add_special_tokens=False)["input_ids"]
        response = list(r.get("response_ids") or [])
        text = r["response"]
        if tokenizer.decode(response, skip_special_tokens=True).strip() != text.strip():  # another tokenizer's, none
            response = tokenizer(text, add_special_tokens=False)["input_ids"]
        if r.get("finished", True) and tokenizer.eos_token_id is not None:
            response.append(tokenizer.eos_token_id)
        ids = (prompt + response)[:max_length]
        if len(ids) > len(prompt):  # else the prompt alone fills max_length: nothing to learn
            out.append({"input_ids": ids, "completion_mask": [0] * len(prompt) + [1] * (len(ids) - len(prompt))})
    return out


def pad_examples(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of `completion_examples`; positions come from the attention mask."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    completion = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], mask[i, :n], completion[i, :n] = torch.tensor(b["input_ids"]), 1, torch.tensor(b["completion_mask"])
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")


def common_args(cfg, out: Path, stage: str = "policies") -> dict:
    """The TRL config arguments shared by every method: `training.trainer_args`."""
    return trainer_args(cfg, out, stage)


def dpo_trainer(cfg, model, tokenizer, pairs: list[dict], out: Path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common_args(cfg, out), beta=cfg.beta, loss_type=[cfg.loss_type],
                     f_divergence_type=DIVERGENCES[cfg.divergence], f_alpha_divergence_coef=cfg.alpha,
                     max_length=cfg.max_length)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                         peft_config=lora_config(cfg) if cfg.use_lora else None)
    suffix = end_of_turn(tokenizer)
    if suffix:  # TRL closes every answer with the template's end of turn; a cut answer's likelihood has none
        def strip(ex):
            out = {}
            for side in ("chosen", "rejected"):
                ids = ex[f"{side}_ids"]
                cut = not ex[f"{side}_finished"] and ids[-len(suffix):] == suffix
                out[f"{side}_ids"] = ids[: -len(suffix)] if cut else ids
            return out

        trainer.train_dataset = trainer.train_dataset.map(strip)
    return trainer


def end_of_turn(tokenizer) -> list[int]:
    """The token ids the chat template puts after an assistant message (e.g. `<|im_end|>`, `\\n`)."""
    if not tokenizer.chat_template:
        return []
    user = [{"role": "user", "content": "x"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "y"}], tokenize=False)
    if not full.startswith(prompt + "y"):
        return []
    return tokenizer(full[len(prompt) + 1:], add_special_tokens=False)["input_ids"]


def sft_trainer(cfg, model, tokenizer, examples: list[dict], out: Path, stage: str = "policies"):
    """TRL's SFT on `completion_examples` (already tokenised: TRL builds the labels from the completion mask)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common_args(cfg, out, stage), max_length=cfg.max_length, completion_only_loss=True)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                      peft_config=lora_config(cfg) if cfg.use_lora else None)


def fixed_reward(cfg, names: list[str], normalizer: Normalizer, palette: dict | None = None):
    """The one reward an RL method maximises, as (weights, normalizer): w·r̃ on normalised rewards for `objective` /
    `weights`; for a MAP palette (MAP-F, docs/algorithms.md §6) β·λᵀr on raw rewards (normalizer None), so that the
    KL-regularised optimum π_ref·exp(R/β) is exactly p_λ ∝ π_ref·exp(λᵀr)."""
    if palette is not None:
        return [cfg.beta * float(v) for v in palette["lam"]], None
    return objective_weights(cfg, names), normalizer


def _texts(items) -> list[str]:
    return [x[-1]["content"] if isinstance(x, list) else x for x in items]


def reward_callables(reward_set, normalizer: Normalizer | None, names: list[str], weights: list[float]):
    """GRPO reward functions: one per objective with a non-zero weight (TRL logs them separately), each returning
    the normalised reward (raw when `normalizer` is None), with `weights` as TRL's reward_weights."""
    funcs, used = [], []
    for i, g in enumerate(names):
        if weights[i] == 0:
            continue

        def score(prompts, completions, i=i, **_):
            raw = reward_set.score(_texts(prompts), _texts(completions)).double()
            return (normalizer(raw) if normalizer is not None else raw)[:, i].tolist()

        score.__name__ = g
        funcs.append(score)
        used.append(weights[i])
    return funcs, used


def grpo_trainer(cfg, model, tokenizer, prompts: list[str], reward_set, normalizer, names, weights, out: Path,
                 system_prompt: str | None = None):
    """With raw rewards (a palette) advantages are not divided by the group's std: that rescaling would change the
    reward, and with it the KL-regularised optimum p_λ."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    funcs, used = reward_callables(reward_set, normalizer, names, weights)
    args = GRPOConfig(**common_args(cfg, out), beta=cfg.beta, num_generations=cfg.num_generations,
                      max_completion_length=cfg.max_completion_length, reward_weights=used, temperature=1.0,
                      scale_rewards="group" if normalizer is not None else "none", **vllm_args(cfg))
    data = Dataset.from_list([{"prompt": _user(p, system_prompt)} for p in prompts])
    return GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tokenizer,
                       peft_config=lora_config(cfg) if cfg.use_lora else None)


VLLM_WINDOW = ("0.19.0", "0.27.1")  # the vLLM versions TRL 1.12 generates with (trl/import_utils.py)


def vllm_args(cfg) -> dict:
    """TRL's GRPOConfig vLLM keys, after checking that an installed vLLM lies in TRL's window (TRL only warns)."""
    if not cfg.use_vllm:
        return {}
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        have = version("vllm")
    except PackageNotFoundError:
        have = None
    low, high = VLLM_WINDOW
    if have is None or not Version(low) <= Version(Version(have).base_version) <= Version(high):
        found = f"vLLM {have} is installed" if have else "vLLM is not installed"
        raise ConfigError(f"use_vllm: {found}; TRL's GRPO generates with vLLM {low}–{high}. Install one "
                          f"(pip install 'vllm>={low},<={high}') or set use_vllm: false.")
    out = {"use_vllm": True, "vllm_mode": cfg.vllm_mode}
    if cfg.vllm_mode == "colocate":
        out["vllm_gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
    elif cfg.vllm_server_base_url:
        out["vllm_server_base_url"] = cfg.vllm_server_base_url
    return out


class TextReward(torch.nn.Module):
    """The registry's reward functions as the reward *model* TRL's PPO expects. TRL calls
    `getattr(rm, rm.base_model_prefix)(input_ids, attention_mask, ...)`, takes `.hidden_states[-1]`, applies
    `rm.score` and reads it at the last response token; so the backbone decodes each (prompt, response), scores the
    text, and returns the scalar w·r at every position, and `score` is the identity."""

    base_model_prefix = "backbone"

    def __init__(self, tokenizer, prompts: dict[tuple, str], reward_set, normalizer: Normalizer | None,
                 weights: list[float]):
        super().__init__()
        self.tokenizer, self.prompts, self.reward_set, self.normalizer = tokenizer, prompts, reward_set, normalizer
        self.lengths = sorted({len(k) for k in prompts}, reverse=True)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float64), persistent=False)
        self.score = torch.nn.Identity()

    @staticmethod
    def key(ids, pad_token_id: int) -> tuple:
        """Prompt ids as TRL's get_reward passes them (pad ids replaced by 0)."""
        return tuple(0 if t == pad_token_id else int(t) for t in ids)

    def split(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[str, str]:
        start = int(mask.long().argmax())
        row = ids[start:].tolist()
        for n in self.lengths:
            prompt = self.prompts.get(tuple(row[:n]))
            if prompt is not None:
                response = ids[start + n:][mask[start + n:]]
                return prompt, self.tokenizer.decode(response, skip_special_tokens=True)
        raise RuntimeError("PPO passed a query that is not one of the training prompts.")

    def backbone(self, input_ids, attention_mask, **_):
        from types import SimpleNamespace

        pairs = [self.split(ids, m.bool()) for ids, m in zip(input_ids, attention_mask)]
        raw = self.reward_set.score([p for p, _ in pairs], [r for _, r in pairs]).double()
        reward = (self.normalizer(raw) if self.normalizer is not None else raw) @ self.weights.cpu()
        hidden = reward.to(input_ids.device, torch.float32)[:, None, None].expand(*input_ids.shape, 1)
        return SimpleNamespace(hidden_states=(hidden,))


def ppo_trainer(cfg, model, tokenizer, prompts: list[str], reward_set, normalizer, names, weights, out: Path,
                system_prompt: str | None = None, num_processes: int = 1):
    """TRL's PPO (trl.experimental, trl ≤ 1.12) with the registry's rewards as reward model and a value head on a copy
    of π_ref (a sequence classifier with one label, trained in full); KL coefficient β."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError("PPO needs a pad token distinct from EOS: TRL's PPO masks every pad id, so EOS tokens "
                          "inside the prompts would vanish. Use a tokenizer with its own pad token.")
    tokenizer.padding_side = "left"
    ids = [tokenizer.apply_chat_template(_user(p, system_prompt), add_generation_prompt=True, tokenize=True,
                                         return_dict=False) for p in prompts]
    keys = {TextReward.key(i, tokenizer.pad_token_id): p for i, p in zip(ids, prompts)}
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
    args = PPOConfig(**{**common_args(cfg, out), "save_strategy": "no"}, kl_coef=cfg.beta,
                     response_length=cfg.max_completion_length, num_ppo_epochs=cfg.num_ppo_epochs,
                     num_mini_batches=cfg.num_mini_batches, stop_token="eos", temperature=1.0,
                     total_episodes=cfg.max_steps * batch if cfg.max_steps > 0 else None)
    value = AutoModelForSequenceClassification.from_pretrained(model.config._name_or_path, num_labels=1,
                                                               dtype=model.dtype).to(model.device)
    value.config.pad_token_id = tokenizer.pad_token_id
    reward = TextReward(tokenizer, keys, reward_set, normalizer, weights)
    return PPOTrainer(args=args, processing_class=tokenizer, model=model, ref_model=None, reward_model=reward,
                      value_model=value,
                      train_dataset=Dataset.from_dict({"input_ids": ids}),
                      peft_config=lora_config(cfg) if cfg.use_lora else None)


def save_policy(trainer, tokenizer, out: Path, merge: bool) -> dict:
    """policies/<name>/adapter (or model, when trained in full) and optionally merged/; temp folder then rename."""

    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "policy", model)  # PPO trains a (policy, value) wrapper: keep the policy
    is_lora = isinstance(model, PeftModel)
    if is_lora and not any(p.numel() for n, p in model.named_parameters() if "lora_" in n):
        raise RuntimeError("the LoRA adapter has no weights to save (ZeRO-3 partitions them): use the ZeRO-2 config "
                           "for LoRA training.")
    saved = {}
    for kind, obj in [("adapter" if is_lora else "model", model)] + ([("merged", None)] if merge and is_lora else []):
        with atomic_dir(out / kind) as tmp:
            (obj if obj is not None else model.merge_and_unload()).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        saved[kind] = str(out / kind)
    return saved


def soup_model(adapters: dict[str, str | Path], weights: dict[str, float], cache_dir: str | None = None):
    """Rewarded soup of LoRA adapters on one base (docs/algorithms.md §5): ΔW = Σ_i w_i B_i A_i exactly, through PEFT's
    `add_weighted_adapter(combination_type="cat")` ("linear" would mix A and B separately: not the same).
    Returns the merged model and its base's path."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM


    names = list(adapters)
    if set(weights) != set(names):
        raise ConfigError(f"soup weights name {sorted(weights)}, the adapters are {sorted(names)}.")
    bases = {adapter_base(Path(p)) for p in adapters.values()}
    if len(bases) != 1:
        raise ConfigError(f"a soup needs adapters of one base model, got {sorted(bases)}.")
    base_path = resolve_model(bases.pop(), cache_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapters[names[0]]),
                                      adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(adapters[n]), adapter_name=n)
    model.add_weighted_adapter(names, [weights[n] for n in names], "soup", combination_type="cat")
    model.set_adapter("soup")
    return model.merge_and_unload(adapter_names=["soup"]), base_path


def soup(adapters: dict[str, str | Path], weights: dict[str, float], out: str | Path, cache_dir: str | None = None):
    """Save the soup as a full checkpoint (temp folder, then rename)."""
    merged, base_path = soup_model(adapters, weights, cache_dir)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(base_path).save_pretrained(tmp)
    return Path(out)
