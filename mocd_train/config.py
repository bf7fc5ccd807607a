"""Stage configs: one dataclass per stage, read from a YAML recipe plus `--key value` overrides.

A recipe is either a stage file (flat keys) or a pipeline file: shared keys at the top level and one section per
stage (`rollouts:`, ...). A stage reads the shared keys plus its own section. Every mistake (unknown key, wrong type,
unknown objective, missing file) raises one `ConfigError` that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mocd_train.assets import PROMPT_SOURCES
from mocd_train.errors import ConfigError  # noqa: F401  (re-exported: the name callers import from here)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class CommonConfig:
    """Keys every stage shares (the top level of a pipeline YAML)."""

    run_dir: str = field(default="runs/default", metadata=_help("Run directory; every stage reads and writes here."))
    seed: int = field(default=0, metadata=_help("Base random seed; each chunk of work derives its own from it."))
    model: str = field(
        default="smollm2-135m-instruct",
        metadata=_help(
            "Reference policy π_ref: 'smollm2-135m-instruct' (embedded, offline), a hub id, a local checkpoint "
            "or a trained policy folder (<run_dir>/policies/<name>; a LoRA adapter is merged on load)."
        ),
    )
    objectives: list = field(
        default_factory=lambda: ["helpfulness", "harmlessness"],
        metadata=_help(
            "Objectives, in order: registry names (see `mocd rewards`) or mappings "
            "{name, type, ...options}, e.g. {name: helpful, type: hf_reward_model, model: <id or path>, head: 0}."
        ),
    )
    device: str = field(default="auto", metadata=_help("'auto' (the accelerate process's device), 'cpu' or 'cuda'."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("Model dtype; 'auto' = float32 on CPU (bf16 is ~7x slower there), bf16 on GPU.")
    )
    cache_dir: str | None = field(
        default=None, metadata=_help("Cache for converted assets; default $MOCD_CACHE or ~/.cache/mocd_train.")
    )
    report_to: Literal["wandb", "none"] = field(
        default="wandb", metadata=_help("Tracking: 'wandb' (offline unless WANDB_MODE says otherwise) or 'none'.")
    )


@dataclass
class RolloutsConfig(CommonConfig):
    """K responses per prompt from π_ref, scored by every objective (stage `rollouts`)."""

    prompt_sources: list[str] = field(
        default_factory=lambda: ["chatterbot", "donotanswer", "truthfulqa"],
        metadata=_help("Packaged prompt sets to mix (see `mocd prompts`); ignored when prompts_file is set."),
    )
    prompts_file: str | None = field(
        default=None, metadata=_help("A .jsonl/.json/.txt file of your own prompts (field 'prompt' per JSON line), or "
                                     "hf:<dataset>[@split] (a 'prompt' column or HH 'chosen' transcripts).")
    )
    split: Literal["train", "heldout"] = field(
        default="train", metadata=_help("Which deterministic split to roll out (applies to prompts_file too)."))
    heldout_fraction: float = field(default=0.2, metadata=_help("Share of prompts held out for evaluation."))
    max_prompts: int | None = field(
        default=None, metadata=_help("Use at most this many prompts, balanced across sources (None = all).")
    )
    num_samples: int = field(default=4, metadata=_help("K: responses per prompt."))
    max_new_tokens: int = field(default=48, metadata=_help("Response length cap in tokens."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature of π_ref."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling threshold (1.0 = off)."))
    system_prompt: str | None = field(
        default=None, metadata=_help("System message for the chat template (None = the template's own default).")
    )
    chunk_size: int = field(
        default=16,
        metadata=_help(
            "Prompts per chunk: the unit of resumption and of seeding, generated as one batch of chunk_size x K rows. "
            "Changing it changes the samples."
        ),
    )
    score_batch_size: int = field(default=64, metadata=_help("Texts per batch for the scorers."))
    normalization: Literal["zscore", "none"] = field(
        default="zscore",
        metadata=_help("Per-objective normalisation fitted on these rollouts (docs/algorithms.md §1).")
    )
    overwrite: bool = field(default=False, metadata=_help("Delete existing rollouts in run_dir and start over."))


@dataclass
class ValueConfig(CommonConfig):
    """Multi-objective value model V(x, y^t) ∈ R^G trained on the rollouts (stage `value`, docs/algorithms.md §2)."""

    name: str = field(default="value", metadata=_help("Output folder <run_dir>/<name> (decoders read "
                                                          "<run_dir>/value/model unless given `value_model`)."))

    backbone: str | None = field(
        default=None, metadata=_help("Backbone: None = π_ref (`model`); or an embedded name, hub id or path.")
    )
    init_from: Literal["causal_lm", "reward_model"] = field(
        default="causal_lm",
        metadata=_help("'reward_model': the body of a sequence-classification RM, its score layer replaced by the "
                       "G-output head (the RMOD paper's gpt2-large RM set-up)."),
    )
    num_layers: int | None = field(
        default=None, metadata=_help("Keep only the backbone's first N layers (cheaper to train and to decode with).")
    )
    train_mode: Literal["full", "lora", "frozen"] = field(
        default="full", metadata=_help("What trains besides the head: the whole backbone, LoRA adapters, or nothing.")
    )
    lora_r: int = field(default=16, metadata=_help("LoRA rank (train_mode lora)."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha."))
    lora_dropout: float = field(default=0.0, metadata=_help("LoRA dropout."))
    lora_target_modules: list[str] | str = field(
        default="all-linear", metadata=_help("LoRA target modules: 'all-linear' or a list of module names.")
    )
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate (the head's included)."))
    num_train_epochs: float = field(default=2.0, metadata=_help("Passes over the training sequences."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Sequences per step per process."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Steps accumulated per optimiser update."))
    warmup_ratio: float = field(default=0.05, metadata=_help("Share of steps with linear warm-up."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_length: int = field(default=512, metadata=_help("Truncate sequences (prompt + response) to this many tokens."))
    heldout_fraction: float = field(
        default=0.1, metadata=_help("Share of rollout prompts (all their responses) held out for the metrics.")
    )
    pairwise_weight: float = field(
        default=0.0, metadata=_help("Weight of the within-prompt pairwise (Bradley–Terry) term beside the paper's "
                                    "regression; 0 trains the paper's loss alone. Batches then hold whole prompts: "
                                    "per_device_train_batch_size must be a multiple of the samples per prompt."))
    pair_margin: float = field(
        default=0.5, metadata=_help("Pairs of one prompt's responses whose final normalised rewards differ by at "
                                    "least this enter the pairwise term and the pairwise-accuracy metric."))
    validation_fraction: float = field(
        default=0.0, metadata=_help("Share of the training prompts set aside to pick the checkpoint (every "
                                    "save_steps) with the best within-prompt pairwise accuracy at 25 % of the "
                                    "response; 0 keeps the last checkpoint."))
    early_stopping_patience: int = field(
        default=0, metadata=_help("With validation: stop after this many evaluations without improvement (0: never)."))
    train_prompts: int | None = field(
        default=None, metadata=_help("Train on a seeded subset of this many rollout prompts (data ablations; the "
                                     "held-out prompts stay the same)."))
    samples_per_prompt: int | None = field(
        default=None, metadata=_help("Train on the first N samples of each prompt only (data ablations)."))
    eval_batch_size: int = field(default=16, metadata=_help("Sequences per batch when computing metrics."))
    save_steps: int = field(default=50, metadata=_help("Checkpoint every N optimiser steps (resume point)."))
    logging_steps: int = field(default=10, metadata=_help("Log the training loss every N steps."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Trade compute for memory (large backbones)."))
    overwrite: bool = field(default=False, metadata=_help("Delete an existing value stage in run_dir and start over."))


@dataclass
class PaletteConfig(CommonConfig):
    """MAP value palette → λ for the fixed reward λᵀr, or a proof it is unreachable (stage `palette`, §6)."""

    name: str = field(default="default", metadata=_help("Output: <run_dir>/palette/<name>/palette.json."))
    targets: dict = field(
        default_factory=dict,
        metadata=_help("Target level per objective: a number (raw reward units), a quantile of π_ref's rewards "
                       "('80%'), 'keep' (π_ref's mean) or {classifier: κ} (c0 + log(1 + κ)). Unnamed ones: keep."),
    )
    overwrite: bool = field(default=False, metadata=_help("Solve again even if palette/<name> is complete."))
    auto_adjust: Literal["none", "interpolate", "greedy"] = field(
        default="none",
        metadata=_help("For an infeasible palette: 'interpolate' (largest feasible step from π_ref towards it) or "
                       "'greedy' (objectives in `priority` order take what they can); 'none' = report and fail."),
    )
    priority: list[str] | None = field(default=None, metadata=_help("Objective order for greedy (default: as listed)."))
    method: Literal["lbfgsb", "cyclic"] = field(
        default="lbfgsb", metadata=_help("Dual solver: L-BFGS-B on all λ, or cyclic (sequential alignment).")
    )
    grouping: Literal["prompt", "pooled"] = field(
        default="prompt",
        metadata=_help("'prompt': normalise q_λ within each prompt's rollouts, as p_λ(y|x), MAP-D and MAP-F do; "
                       "'pooled': one pool over all samples, the MAP paper's estimator (it also reweights prompts)."),
    )
    tol: float = field(default=1e-6, metadata=_help("KKT tolerance, in standard deviations of each objective."))


@dataclass
class TeachConfig(CommonConfig):
    """Decode prompts with a decoding-time teacher and write its outputs as a dataset (stage `teach`)."""

    decoder: Literal["rmod", "cd_uniform", "cd_single", "cd_fixed", "cd_maximin", "best_of_k", "pi_ref", "map_d", "mod",
                     "soup"] = field(default="rmod",
                                     metadata=_help("The teacher (docs/algorithms.md §3–6); see README 'Decoders'."))
    name: str | None = field(default=None, metadata=_help("Output folder teach/<name> (default: the decoder's name)."))
    rmod_lambda: float = field(
        default=1.0, metadata=_help("RMOD's scalar KL trade-off λ (not MAP's weights): large = robust to the worst "
                                    "objective. Also the temperature of selection: sample."))
    num_candidates: int = field(default=4, metadata=_help("K: candidate blocks per step (samples for MAP-D)."))
    block_size: int = field(default=8, metadata=_help("B: tokens per block (Best-of-K uses B = max_new_tokens)."))
    max_new_tokens: int = field(default=64, metadata=_help("T: response length cap."))
    selection: Literal["argmax", "sample"] = field(
        default="argmax", metadata=_help("RMOD: keep argmax_k w·V_k (paper) or sample ∝ exp(λ w·V_k)."))
    weights_method: Literal["exact", "paper"] = field(
        default="exact", metadata=_help("RMOD weights: exact solver, or the paper's 10-step update (comparison)."))
    objective: str | None = field(default=None, metadata=_help("cd_single: the objective to follow."))
    weights: list[float] | None = field(
        default=None, metadata=_help("cd_fixed: one weight per objective; mod / soup: one per policy, summing to 1."))
    policies: list[str] | None = field(
        default=None, metadata=_help("mod / soup: the per-objective policies — names under <run_dir>/policies or "
                                     "folders (LoRA adapters on one base run as one batched forward)."))
    divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] = field(
        default="reverse_kl", metadata=_help("mod: the f-divergence the policies were trained with (picks the rule)."))
    alpha: float = field(default=0.5, metadata=_help("mod: α of the α-divergence rule, in (0, 1]."))
    jsd_approximation: bool = field(
        default=False, metadata=_help("mod, divergence js: decode with the reverse-KL rule instead (the MOD reference "
                                      "code's substitute; an approximation)."))
    greedy: bool = field(default=False, metadata=_help("mod / soup: argmax of the combined distribution."))
    top_k: int = field(default=0, metadata=_help("mod / soup: sample within the top-k tokens (0: all)."))
    best_of_k_rule: Literal["uniform", "maximin", "rmod"] = field(
        default="uniform", metadata=_help("best_of_k: how the K full responses are compared."))
    score_with: Literal["value", "reward"] = field(
        default="value", metadata=_help("Candidates scored by the trained value model or by the reward functions."))
    value_model: str | None = field(default=None, metadata=_help("Value model folder (default <run_dir>/value/model)."))
    palette: str | None = field(default=None, metadata=_help("map_d: palette name under <run_dir>/palette or a path."))
    split: Literal["train", "heldout"] = field(
        default="train", metadata=_help("Prompts to decode: train (teacher data) or heldout (evaluation)."))
    max_prompts: int | None = field(default=None, metadata=_help("At most this many prompts (balanced by source)."))
    first_prompt: int = field(
        default=0, metadata=_help("Skip the split's first N prompts: e.g. a validation slice after the evaluation "
                                  "prompts, disjoint from them (the order is fixed by the prompt texts)."))
    temperature: float = field(default=1.0, metadata=_help("π_ref sampling temperature."))
    top_p: float = field(default=1.0, metadata=_help("π_ref nucleus threshold."))
    batch_size: int = field(default=8, metadata=_help("Prompts decoded together (× K rows)."))
    chunk_size: int = field(default=16, metadata=_help("Prompts per shard file: the unit of resumption and seeding."))
    overwrite: bool = field(default=False, metadata=_help("Delete teach/<name> and start over."))


DIVERGENCES = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js": "js_divergence",
               "alpha": "alpha_divergence"}  # ours → TRL's f_divergence_type
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}


@dataclass
class TrainingConfig(CommonConfig):
    """Keys shared by the stages that fine-tune a model with TRL (policies, distill)."""

    use_lora: bool = field(default=True, metadata=_help("Train LoRA adapters (else the full model)."))
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha."))
    lora_dropout: float = field(default=0.0, metadata=_help("LoRA dropout."))
    lora_target_modules: list[str] | str = field(default="all-linear", metadata=_help("LoRA target modules."))
    merge: bool = field(default=False, metadata=_help("Also save the adapter merged into a full checkpoint."))
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate."))
    num_train_epochs: float = field(default=1.0, metadata=_help("Passes over the training data."))
    max_steps: int = field(default=-1, metadata=_help("Stop after this many optimiser steps (-1: use epochs)."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Examples per step per process."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Steps per optimiser update."))
    max_length: int = field(default=256, metadata=_help("Prompt + response tokens kept."))
    logging_steps: int = field(default=10, metadata=_help("Log every N steps."))
    save_steps: int = field(default=50, metadata=_help("Checkpoint every N steps (resume point)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Trade compute for memory."))


@dataclass
class PolicyConfig(TrainingConfig):
    """A policy trained with TRL for one objective or fixed weights (stage `policies`, docs/algorithms.md §4–6)."""

    method: Literal["sft", "dpo", "grpo", "ppo"] = field(default="dpo", metadata=_help("Training method."))
    objective: str | None = field(default=None, metadata=_help("Train for this one objective..."))
    weights: dict | None = field(
        default=None, metadata=_help("...or for fixed weights {objective: w} on the normalised rewards (MO-DPO, "
                                     "MO-GRPO)..."))
    palette: str | None = field(
        default=None, metadata=_help("...or (GRPO/PPO) for a solved MAP palette (a name under <run_dir>/palette or a "
                                     ".json): MAP-F, reward β·λᵀr on raw rewards, whose optimum is p_λ."))
    divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] = field(
        default="reverse_kl", metadata=_help("DPO's f-divergence regulariser (f-DPO); MOD combines policies by it."))
    alpha: float = field(default=0.5, metadata=_help("α of the α-divergence (divergence: alpha), in (0, 1)."))
    beta: float = field(default=0.1, metadata=_help("KL coefficient β (DPO; GRPO's KL term; PPO's kl_coef)."))
    loss_type: str = field(default="sigmoid", metadata=_help("TRL DPO loss type."))
    pair_margin: float = field(
        default=0.0, metadata=_help("DPO pairs: skip prompts whose best and worst response differ by ≤ this "
                                    "(normalised weighted reward)."))
    sft_dataset: str | None = field(
        default=None, metadata=_help("SFT: a teacher name under <run_dir>/teach, or a dataset folder with "
                                     "prompt/response columns."))
    name: str | None = field(default=None, metadata=_help("Output folder policies/<name> (default from the method)."))
    num_generations: int = field(default=4, metadata=_help("GRPO: completions per prompt (group size)."))
    max_completion_length: int = field(default=48, metadata=_help("GRPO/PPO: completion length cap."))
    max_prompts: int | None = field(default=None, metadata=_help("GRPO/PPO: at most this many train prompts."))
    num_ppo_epochs: int = field(default=4, metadata=_help("PPO: optimisation passes over each rollout batch."))
    num_mini_batches: int = field(default=1, metadata=_help("PPO: minibatches per rollout batch."))
    overwrite: bool = field(default=False, metadata=_help("Delete policies/<name> and start over."))


@dataclass
class DistillConfig(TrainingConfig):
    """Distil teacher datasets into one student checkpoint that loads without mocd_train (stage `distill`, §7)."""

    teachers: dict = field(
        default_factory=dict, metadata=_help("{teacher name under <run_dir>/teach (or a dataset folder): weight}; a "
                                             "weight w ≤ 1 keeps that share of the teacher's rows (seeded)."))
    student: str | None = field(default=None, metadata=_help("The student to fine-tune (default: `model`, π_ref)."))
    name: str | None = field(default=None, metadata=_help("Output folder distill/<name> (default: the teachers)."))
    deduplicate: bool = field(default=True, metadata=_help("Drop repeated (prompt, response) pairs across teachers."))
    min_worst_case: float | str | None = field(
        default=None, metadata=_help("Keep rows whose normalised worst-case reward min_g r̃_g is at least this number "
                                     "or quantile ('50%')."))
    heldout_fraction: float = field(
        default=0.1, metadata=_help("Teacher prompts held out to measure the student's likelihood of them."))
    loss: Literal["sft", "token_kl"] = field(
        default="sft", metadata=_help("sft: likelihood of the teacher's responses; token_kl (one MOD teacher): KL to "
                                      "MOD's combined next-token distribution at every response token."))
    overwrite: bool = field(default=False, metadata=_help("Delete distill/<name> and start over."))


@dataclass
class EvaluateConfig(CommonConfig):
    """Compare methods decoded on the same held-out prompts: table, plots, HTML report, W&B (stage `evaluate`, §8)."""

    methods: list[str] = field(
        default_factory=list, metadata=_help("Teacher datasets under <run_dir>/teach to compare (decode policies and "
                                             "students with `teach.py --decoder pi_ref --model ...`)."))
    reference: str = field(default="eval-pi_ref", metadata=_help("The π_ref dataset every method is paired with."))
    baselines: list[str] = field(
        default_factory=list, metadata=_help("Methods every other method is also compared with, e.g. "
                                             "[eval-cd_uniform]: the report states each difference in mean per-prompt "
                                             "worst case with its interval and whether it is significant."))
    fronts: dict | None = field(
        default=None, metadata=_help("Families of methods whose Pareto hypervolumes are compared with bootstrap "
                                     "intervals, e.g. {mod: [eval-mod-0.25, eval-mod-0.5], soup: [...]}."))
    note: str = field(default="", metadata=_help("A line printed at the top of the report (e.g. 'smoke-sized run')."))
    export_dir: str | None = field(
        default=None, metadata=_help("Also copy the report, tables, plots, value metrics and step timings here (e.g. "
                                     "results/<preset>); the pipeline refreshes its pipeline.json when it ends."))
    name: str = field(default="eval", metadata=_help("Output folder <run_dir>/<name>."))
    samples: int = field(default=3, metadata=_help("Sample responses per method in the HTML report."))
    overwrite: bool = field(default=True, metadata=_help("Re-evaluate even if a report exists (it is cheap)."))


STAGES: dict[str, type[CommonConfig]] = {"rollouts": RolloutsConfig, "value": ValueConfig, "palette": PaletteConfig,
                                         "teach": TeachConfig, "policies": PolicyConfig, "distill": DistillConfig,
                                         "evaluate": EvaluateConfig}

# Keys whose change does not alter a stage's outputs: a resumed run may use different values.
RESUME_FREE_KEYS = {"report_to", "device", "cache_dir", "score_batch_size", "overwrite", "eval_batch_size",
                    "logging_steps", "save_steps", "gradient_checkpointing"}


# ----------------------------------------------------------------------------------------------------------- types


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # X | None: X's own message names the problem better
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}.{hint}")
    if origin is list or tp is list:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}. Write it as [a, b] in YAML or on the command "
                              "line.")
        (item_tp,) = args or (Any,)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}.")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}.")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}.")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}. Quote it in YAML.")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(sorted(known))}."
    return ConfigError(f"unknown key {key!r} in {where}.{hint}")


def build_config(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Type-check `values` against the dataclass `cls` and run its validation."""
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise _unknown_key(key, list(known), where)
        kwargs[key] = _coerce(key, value, hints[key])
    cfg = cls(**kwargs)
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------------ validation


def validate(cfg: CommonConfig) -> None:
    """Checks that need more than a type: objective names, files, ranges."""
    from mocd_train.rewards import parse_objectives  # late: the reward registry imports torch; --help needs neither

    parse_objectives(cfg.objectives)
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device: {cfg.device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    check = _CHECKS.get(type(cfg))
    if check:
        check(cfg)


def _check_rollouts(cfg: RolloutsConfig) -> None:
    if cfg.prompts_file is not None and not cfg.prompts_file.startswith("hf:") and not Path(cfg.prompts_file).is_file():
        raise ConfigError(f"prompts_file: {cfg.prompts_file!r} does not exist. Give a path to a .jsonl/.json/.txt "
                          "file, or hf:<dataset>[@split] for a hub dataset.")
    if cfg.prompts_file is None:
        if not cfg.prompt_sources:
            raise ConfigError("prompt_sources: empty. Name packaged sources or set prompts_file.")
        for src in cfg.prompt_sources:
            if src not in PROMPT_SOURCES:
                raise _unknown_key(src, list(PROMPT_SOURCES), "prompt_sources")
    _positive(cfg, "num_samples", "max_new_tokens", "chunk_size", "score_batch_size")
    if cfg.max_prompts is not None:
        _positive(cfg, "max_prompts")
    _fraction(cfg, "heldout_fraction")
    if cfg.temperature <= 0:
        raise ConfigError("temperature: must be > 0 (sampling K different responses needs randomness).")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"top_p: {cfg.top_p} must lie in (0, 1].")


def _check_value(cfg: ValueConfig) -> None:
    _positive(cfg, "lora_r", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
              "eval_batch_size", "save_steps", "logging_steps")
    if cfg.num_layers is not None:
        _positive(cfg, "num_layers")
    _fraction(cfg, "heldout_fraction")
    if cfg.learning_rate <= 0 or cfg.num_train_epochs <= 0:
        raise ConfigError("learning_rate and num_train_epochs must be > 0.")
    for key in ("train_prompts", "samples_per_prompt"):
        if getattr(cfg, key) is not None:
            _positive(cfg, key)
    if cfg.pairwise_weight < 0 or cfg.pair_margin < 0 or cfg.early_stopping_patience < 0:
        raise ConfigError("pairwise_weight, pair_margin and early_stopping_patience must be ≥ 0.")
    if not 0 <= cfg.validation_fraction < 1:
        raise ConfigError(f"validation_fraction: {cfg.validation_fraction} must lie in [0, 1).")
    if cfg.early_stopping_patience and not cfg.validation_fraction:
        raise ConfigError("early_stopping_patience needs validation_fraction > 0: early stopping watches the "
                          "validation prompts' pairwise accuracy.")


def _check_palette(cfg: PaletteConfig) -> None:
    from mocd_train.rewards import parse_objectives  # late: imports torch

    names = [o.name for o in parse_objectives(cfg.objectives)]
    for key in list(cfg.targets) + list(cfg.priority or []):
        if key not in names:
            raise _unknown_key(key, names, "targets/priority (objective names)")
    if cfg.priority is not None and sorted(cfg.priority) != sorted(names):
        raise ConfigError(f"priority: {cfg.priority} must list every objective once: {names}.")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name: {cfg.name!r} must be a plain file name.")
    if cfg.tol <= 0:
        raise ConfigError("tol: must be > 0.")


def _check_teach(cfg: TeachConfig) -> None:
    from mocd_train.rewards import parse_objectives  # late: imports torch

    names = [o.name for o in parse_objectives(cfg.objectives)]
    _positive(cfg, "num_candidates", "block_size", "max_new_tokens", "batch_size", "chunk_size")
    if cfg.max_prompts is not None:
        _positive(cfg, "max_prompts")
    if cfg.first_prompt < 0:
        raise ConfigError(f"first_prompt: {cfg.first_prompt} must be ≥ 0.")
    if cfg.rmod_lambda < 0:
        raise ConfigError("rmod_lambda: must be ≥ 0.")
    if cfg.decoder == "cd_single" and cfg.objective not in names:
        raise ConfigError(f"objective: cd_single needs one of {names}, got {cfg.objective!r}.")
    if cfg.decoder == "cd_fixed" and (cfg.weights is None or len(cfg.weights) != len(names)):
        raise ConfigError(f"weights: cd_fixed needs {len(names)} weights (one per objective {names}), "
                          f"got {cfg.weights}.")
    if cfg.decoder in ("mod", "soup"):
        if not cfg.policies:
            raise ConfigError(f"policies: {cfg.decoder} combines trained policies; name them, e.g. "
                              "--policies [helpfulness-dpo, harmlessness-dpo].")
        if cfg.weights is None or len(cfg.weights) != len(cfg.policies):
            raise ConfigError(f"weights: {cfg.decoder} needs one weight per policy ({len(cfg.policies)}), got "
                              f"{cfg.weights}.")
        if cfg.decoder == "soup" and cfg.divergence != "reverse_kl":
            raise ConfigError("divergence: a rewarded soup mixes weights, it has no combination rule; leave it.")
    if cfg.decoder == "map_d" and not cfg.palette:
        raise ConfigError("palette: map_d needs a solved palette (recipes/solve_palette.py), e.g. --palette hh-65.")
    if cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        raise ConfigError("temperature must be > 0 and top_p in (0, 1].")


def _check_policy(cfg: PolicyConfig) -> None:
    from mocd_train.rewards import parse_objectives  # late: imports torch

    names = [o.name for o in parse_objectives(cfg.objectives)]
    _positive(cfg, "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "lora_r",
              "num_generations", "max_completion_length", "logging_steps", "save_steps", "num_ppo_epochs",
              "num_mini_batches")
    if cfg.method == "sft":
        if not cfg.sft_dataset:
            raise ConfigError("sft_dataset: SFT needs (prompt, response) data: a teacher name or a dataset folder.")
    else:
        if sum(x is not None for x in (cfg.objective, cfg.weights, cfg.palette)) != 1:
            raise ConfigError(f"{cfg.method} trains for one `objective`, for `weights` or for a `palette` — give "
                              f"exactly one (objectives: {names}).")
        if cfg.palette is not None and cfg.method not in ("grpo", "ppo"):
            raise ConfigError(f"palette: MAP-F trains with GRPO or PPO on the reward β·λᵀr, not with {cfg.method}.")
        if cfg.palette is not None and cfg.beta <= 0:
            raise ConfigError("beta: MAP-F needs β > 0 — the reward is β·λᵀr and the KL term at β makes p_λ the "
                              "optimum.")
        if cfg.objective is not None and cfg.objective not in names:
            raise _unknown_key(cfg.objective, names, "objective")
        for key, w in (cfg.weights or {}).items():
            if key not in names:
                raise _unknown_key(key, names, "weights")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError(f"weights.{key}: {w!r} is not a finite number.")
    if cfg.method == "dpo":
        if cfg.divergence != "reverse_kl" and cfg.loss_type not in F_DIVERGENCE_LOSSES:
            raise ConfigError(f"divergence {cfg.divergence!r} needs a loss built on the chosen-rejected reward "
                              f"difference ({', '.join(sorted(F_DIVERGENCE_LOSSES))}), not loss_type "
                              f"{cfg.loss_type!r}.")
        if cfg.divergence == "alpha" and not 0 < cfg.alpha < 1:
            raise ConfigError(f"alpha: {cfg.alpha} must lie in (0, 1).")
    elif cfg.divergence != "reverse_kl":
        raise ConfigError(f"divergence: {cfg.method} regularises with reverse KL only; f-divergences are for DPO.")
    if cfg.method == "ppo" and (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                                % cfg.num_mini_batches):
        raise ConfigError(f"num_mini_batches ({cfg.num_mini_batches}) must divide per_device_train_batch_size × "
                          f"gradient_accumulation_steps ({cfg.per_device_train_batch_size}×"
                          f"{cfg.gradient_accumulation_steps}).")
    if cfg.method == "grpo" and cfg.per_device_train_batch_size % cfg.num_generations:
        raise ConfigError(f"per_device_train_batch_size ({cfg.per_device_train_batch_size}) must be a multiple of "
                          f"num_generations ({cfg.num_generations}).")
    if cfg.beta < 0:
        raise ConfigError("beta: must be ≥ 0.")


def _check_distill(cfg: DistillConfig) -> None:
    _positive(cfg, "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "lora_r",
              "logging_steps", "save_steps")
    if not cfg.teachers:
        raise ConfigError("teachers: name at least one teacher dataset, e.g. --teachers '{rmod: 1.0}'.")
    for key, w in cfg.teachers.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise ConfigError(f"teachers.{key}: weight {w!r} must be a share of its rows in (0, 1].")
    if isinstance(cfg.min_worst_case, str) and not re.fullmatch(r"\d+(\.\d+)?%", cfg.min_worst_case):
        raise ConfigError(f"min_worst_case: {cfg.min_worst_case!r} is neither a number nor a quantile like '50%'.")
    if not 0 <= cfg.heldout_fraction < 1:
        raise ConfigError("heldout_fraction: must lie in [0, 1).")
    if cfg.loss == "token_kl" and len(cfg.teachers) != 1:
        raise ConfigError("loss token_kl distils one MOD teacher's distribution: name exactly one teacher.")


def _check_evaluate(cfg: EvaluateConfig) -> None:
    if not cfg.methods:
        raise ConfigError("methods: name the teacher datasets to compare, e.g. "
                          "--methods '[eval-rmod, eval-cd_uniform]'.")


_CHECKS = {EvaluateConfig: _check_evaluate, RolloutsConfig: _check_rollouts, ValueConfig: _check_value,
           PaletteConfig: _check_palette, TeachConfig: _check_teach, PolicyConfig: _check_policy,
           DistillConfig: _check_distill}


def _fraction(cfg: Any, key: str) -> None:
    if not 0.0 < getattr(cfg, key) < 1.0:
        raise ConfigError(f"{key}: {getattr(cfg, key)} must lie strictly between 0 and 1.")


def _positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be a positive integer, got {getattr(cfg, key)}.")


# ------------------------------------------------------------------------------------------------------ recipes/CLI


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {str(path)!r} does not exist. Recipes live in recipes/<setup>/<stage>.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of keys, not {type(data).__name__}.")
    return data


def stage_values(data: dict[str, Any], stage: str, where: str) -> dict[str, Any]:
    """The flat keys of one stage from a stage file or a pipeline file (a section overrides shared keys)."""
    common = set(_fields(CommonConfig))
    values, section = {}, {}
    for key, value in data.items():
        if key in STAGES and isinstance(value, dict):
            if key == stage:
                section = value
        elif key in common or key in _fields(STAGES[stage]):  # `palette: hh-65` is a key of teach and policies
            values[key] = value
        elif key == "pipeline":  # the step list recipes/pipeline.py runs
            continue
        elif key in STAGES:
            raise ConfigError(f"{key}: the section for stage {key!r} in {where} must be a mapping.")
        else:
            known = sorted(common | set(STAGES) | set(_fields(STAGES[stage])))
            raise _unknown_key(key, known, where)
    return {**values, **section}


# "{best:<evaluation>:<param>}" in a pipeline step: a decoder parameter chosen by an earlier step (recipes/pipeline.py)
BEST = re.compile(r"^\{best:([\w.-]+):(\w+)\}$")


def pipeline_steps(data: dict[str, Any], path: str | Path) -> list[tuple[str, str, dict[str, Any]]]:
    """The `pipeline:` list of a pipeline file → [(stage, config file, step overrides)], each step checked: a step
    names its `stage`, optionally a stage file (`config`, relative to the repository or absolute), and key overrides."""
    steps = data.get("pipeline")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{path}: no `pipeline:` list of steps ({{stage: ..., key: value}}) to run.")
    out = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or step.get("stage") not in STAGES:
            raise ConfigError(f"pipeline[{i}] in {path}: each step needs `stage:` one of {', '.join(STAGES)}, got "
                              f"{step!r}.")
        config = str(step.get("config", path))
        extra = {k: v for k, v in step.items() if k not in ("stage", "config")}
        values = {**stage_values(read_yaml(config), step["stage"], config), **extra}
        values = {k: v for k, v in values.items() if not (isinstance(v, str) and BEST.match(v))}  # checked when run
        build_config(STAGES[step["stage"]], values, where=f"pipeline[{i}] ({step['stage']}, {config})")
        out.append((step["stage"], config, extra))
    return out


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """`--config F --key value --flag` → (F, {key: value}); values are parsed as YAML scalars/lists."""
    config, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: write overrides as --key value.")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw, i = argv[i + 1], i + 1
            else:
                raw = "true"
        i += 1
        if key == "config":
            config = raw
            continue
        try:
            overrides[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            overrides[key] = raw
    return config, overrides


def load_config(stage: str, argv: list[str] | None = None) -> Any:
    """Parse `--config recipe.yaml --key value ...` for `stage` into its dataclass."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(describe(STAGES[stage]))
        raise SystemExit(0)
    config, overrides = parse_overrides(argv)
    values = stage_values(read_yaml(config), stage, config) if config else {}
    values.update(overrides)
    return build_config(STAGES[stage], values, where=f"{stage} config ({config or 'command line'})")


def describe(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    lines = [f"{cls.__name__}: {cls.__doc__.strip()}", "", "keys (--key value or in the YAML recipe):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name} ({_type_name(hints[f.name])}, default {default!r})")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (outside RESUME_FREE_KEYS) whose values differ between a saved and a current config."""
    keys = (set(saved) | set(current)) - RESUME_FREE_KEYS
    return sorted(k for k in keys if saved.get(k) != current.get(k))
