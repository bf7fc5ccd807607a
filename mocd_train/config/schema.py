"""The stage configs: one dataclass per stage, each field with its help text, the checks a type cannot express beside
the fields (`check`), and what a resumed stage may change (`RESUME_FREE_KEYS`)."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mocd_train.assets import PROMPT_SOURCES
from mocd_train.config.types import coerce, doc, fields_of, fraction, positive, unknown_key
from mocd_train.errors import ConfigError


@dataclass
class CommonConfig:
    """Keys every stage shares (the top level of a pipeline YAML)."""

    run_dir: str = field(default="runs/default", metadata=doc("Run directory; every stage reads and writes here."))
    seed: int = field(default=0, metadata=doc("Base random seed; each chunk of work derives its own from it."))
    model: str = field(
        default="smollm2-135m-instruct",
        metadata=doc(
            "Reference policy π_ref: 'smollm2-135m-instruct' (embedded, offline), a hub id, a local checkpoint "
            "or a trained policy folder (<run_dir>/policies/<name>; a LoRA adapter is merged on load)."
        ),
    )
    objectives: list = field(
        default_factory=lambda: ["helpfulness", "harmlessness"],
        metadata=doc(
            "Objectives, in order: registry names (see `mocd rewards`) or mappings "
            "{name, type, ...options}, e.g. {name: helpful, type: hf_reward_model, model: <id or path>, head: 0}."
        ),
    )
    device: str = field(default="auto", metadata=doc("'auto' (the accelerate process's device), 'cpu' or 'cuda'."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=doc("Model dtype; 'auto' = float32 on CPU (bf16 is ~7x slower there), bf16 on GPU.")
    )
    cache_dir: str | None = field(
        default=None, metadata=doc("Cache for converted assets; default $MOCD_CACHE or ~/.cache/mocd_train.")
    )
    report_to: Literal["wandb", "none"] = field(
        default="wandb", metadata=doc("Tracking: 'wandb' (offline unless WANDB_MODE says otherwise) or 'none'.")
    )

    def check(self) -> None:
        """A stage's own checks beyond types (each stage config defines them beside its fields)."""


@dataclass
class SamplingConfig(CommonConfig):
    """The sampler behind the stages that draw from π_ref (rollouts, teach)."""

    backend: Literal["hf", "vllm"] = field(
        default="hf", metadata=doc("π_ref's sampler: 'hf' (Hugging Face with a KV cache; every decoder) or 'vllm' "
                                   "(vLLM with prefix caching: rollouts and every teacher but MOD and soups). vLLM "
                                   "runs in one process and parallelises itself (vllm_args: tensor_parallel_size).",
                                   "sampling (every decoder)"))
    vllm_args: dict | None = field(
        default=None, metadata=doc("Keyword arguments for vllm.LLM, e.g. {gpu_memory_utilization: 0.5, "
                                   "max_model_len: 2048}; on CUDA gpu_memory_utilization defaults to 0.5, leaving "
                                   "room for the value model and the scorers.", "sampling (every decoder)"))

    def check(self) -> None:
        if self.vllm_args and self.backend != "vllm":
            raise ConfigError("vllm_args: only the vLLM backend reads them; set backend: vllm or drop them.")


@dataclass
class RolloutsConfig(SamplingConfig):
    """K responses per prompt from π_ref, scored by every objective (stage `rollouts`)."""

    prompt_sources: list[str] = field(
        default_factory=lambda: ["chatterbot", "donotanswer", "truthfulqa"],
        metadata=doc("Packaged prompt sets to mix (see `mocd prompts`); ignored when prompts_file is set."),
    )
    prompts_file: str | None = field(
        default=None, metadata=doc("A .jsonl/.json/.txt file of your own prompts (field 'prompt' per JSON line), or "
                                     "hf:<dataset>[@split] (a 'prompt' column or HH 'chosen' transcripts).")
    )
    split: Literal["train", "heldout"] = field(
        default="train", metadata=doc("Which deterministic split to roll out (applies to prompts_file too)."))
    heldout_fraction: float = field(default=0.2, metadata=doc("Share of prompts held out for evaluation."))
    max_prompts: int | None = field(
        default=None, metadata=doc("Use at most this many prompts, balanced across sources (None = all).")
    )
    num_samples: int = field(default=4, metadata=doc("K: responses per prompt."))
    max_new_tokens: int = field(default=48, metadata=doc("Response length cap in tokens."))
    temperature: float = field(default=1.0, metadata=doc("Sampling temperature of π_ref."))
    top_p: float = field(default=1.0, metadata=doc("Nucleus sampling threshold (1.0 = off)."))
    system_prompt: str | None = field(
        default=None, metadata=doc("System message for the chat template (None = the template's own default).")
    )
    chunk_size: int = field(
        default=16,
        metadata=doc(
            "Prompts per chunk: the unit of resumption and of seeding, generated as one batch of chunk_size x K rows. "
            "Changing it changes the samples."
        ),
    )
    score_batch_size: int = field(default=64, metadata=doc("Texts per batch for the scorers."))
    normalization: Literal["zscore", "none"] = field(
        default="zscore",
        metadata=doc("Per-objective normalisation fitted on these rollouts (docs/algorithms.md §1).")
    )
    overwrite: bool = field(default=False, metadata=doc("Delete existing rollouts in run_dir and start over."))

    def check(self) -> None:
        super().check()
        cfg = self
        local = cfg.prompts_file is not None and not cfg.prompts_file.startswith("hf:")
        if local and not Path(cfg.prompts_file).is_file():
            raise ConfigError(f"prompts_file: {cfg.prompts_file!r} does not exist. Give a path to a .jsonl/.json/.txt "
                              "file, or hf:<dataset>[@split] for a hub dataset.")
        if cfg.prompts_file is None:
            if not cfg.prompt_sources:
                raise ConfigError("prompt_sources: empty. Name packaged sources or set prompts_file.")
            for src in cfg.prompt_sources:
                if src not in PROMPT_SOURCES:
                    raise unknown_key(src, list(PROMPT_SOURCES), "prompt_sources")
        positive(cfg, "num_samples", "max_new_tokens", "chunk_size", "score_batch_size")
        if cfg.max_prompts is not None:
            positive(cfg, "max_prompts")
        fraction(cfg, "heldout_fraction")
        if cfg.temperature <= 0:
            raise ConfigError("temperature: must be > 0 (sampling K different responses needs randomness).")
        if not 0.0 < cfg.top_p <= 1.0:
            raise ConfigError(f"top_p: {cfg.top_p} must lie in (0, 1].")


@dataclass
class FineTuneConfig(CommonConfig):
    """Keys shared by every stage that fine-tunes with a Trainer (value, policies, distill)."""

    lora_r: int = field(default=16, metadata=doc("LoRA rank (LoRA training only)."))
    lora_alpha: int = field(default=32, metadata=doc("LoRA alpha."))
    lora_dropout: float = field(default=0.0, metadata=doc("LoRA dropout."))
    lora_target_modules: list[str] | str = field(
        default="all-linear", metadata=doc("LoRA target modules: 'all-linear' or a list of module names."))
    learning_rate: float = field(default=5e-5, metadata=doc("Peak learning rate."))
    num_train_epochs: float = field(default=1.0, metadata=doc("Passes over the training data."))
    per_device_train_batch_size: int = field(default=8, metadata=doc("Examples per step per process."))
    gradient_accumulation_steps: int = field(default=1, metadata=doc("Steps accumulated per optimiser update."))
    max_length: int = field(default=256, metadata=doc("Prompt + response tokens kept."))
    logging_steps: int = field(default=10, metadata=doc("Log every N steps."))
    save_steps: int = field(default=50, metadata=doc("Checkpoint every N steps (resume point)."))
    gradient_checkpointing: bool = field(default=False, metadata=doc("Trade compute for memory (large models)."))


@dataclass
class ValueConfig(FineTuneConfig):
    """Multi-objective value model V(x, y^t) ∈ R^G trained on the rollouts (stage `value`, docs/algorithms.md §2)."""

    name: str = field(default="value", metadata=doc("Output folder <run_dir>/<name> (decoders read "
                                                          "<run_dir>/value/model unless given `value_model`)."))

    backbone: str | None = field(
        default=None, metadata=doc("Backbone: None = π_ref (`model`); or an embedded name, hub id or path.")
    )
    init_from: Literal["causal_lm", "reward_model"] = field(
        default="causal_lm",
        metadata=doc("'reward_model': the body of a sequence-classification RM, its score layer replaced by the "
                       "G-output head (the RMOD paper's gpt2-large RM set-up)."),
    )
    num_layers: int | None = field(
        default=None, metadata=doc("Keep only the backbone's first N layers (cheaper to train and to decode with).")
    )
    train_mode: Literal["full", "lora", "frozen"] = field(
        default="full", metadata=doc("What trains besides the head: the whole backbone, LoRA adapters, or nothing.")
    )
    num_train_epochs: float = field(default=2.0, metadata=doc("Passes over the training sequences."))
    warmup_ratio: float = field(default=0.05, metadata=doc("Share of steps with linear warm-up."))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay."))
    max_length: int = field(default=512, metadata=doc("Truncate sequences (prompt + response) to this many tokens."))
    heldout_fraction: float = field(
        default=0.1, metadata=doc("Share of rollout prompts (all their responses) held out for the metrics.")
    )
    pairwise_weight: float = field(
        default=0.0, metadata=doc("Weight of the within-prompt pairwise (Bradley–Terry) term beside the paper's "
                                    "regression; 0 trains the paper's loss alone. Batches then hold whole prompts: "
                                    "per_device_train_batch_size must be a multiple of the samples per prompt."))
    pair_margin: float = field(
        default=0.5, metadata=doc("Pairs of one prompt's responses whose final normalised rewards differ by at "
                                    "least this enter the pairwise term and the pairwise-accuracy metric."))
    validation_fraction: float = field(
        default=0.0, metadata=doc("Share of the training prompts set aside to pick the checkpoint (every "
                                    "save_steps) with the best within-prompt pairwise accuracy at 25 % of the "
                                    "response; 0 keeps the last checkpoint."))
    early_stopping_patience: int = field(
        default=0, metadata=doc("With validation: stop after this many evaluations without improvement (0: never)."))
    train_prompts: int | None = field(
        default=None, metadata=doc("Train on a seeded subset of this many rollout prompts (data ablations; the "
                                     "held-out prompts stay the same)."))
    samples_per_prompt: int | None = field(
        default=None, metadata=doc("Train on the first N samples of each prompt only (data ablations)."))
    eval_batch_size: int = field(default=16, metadata=doc("Sequences per batch when computing metrics."))
    overwrite: bool = field(default=False, metadata=doc("Delete an existing value stage in run_dir and start over."))

    def check(self) -> None:
        cfg = self
        positive(cfg, "lora_r", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                  "eval_batch_size", "save_steps", "logging_steps")
        if cfg.num_layers is not None:
            positive(cfg, "num_layers")
        fraction(cfg, "heldout_fraction")
        if cfg.learning_rate <= 0 or cfg.num_train_epochs <= 0:
            raise ConfigError("learning_rate and num_train_epochs must be > 0.")
        for key in ("train_prompts", "samples_per_prompt"):
            if getattr(cfg, key) is not None:
                positive(cfg, key)
        if cfg.pairwise_weight < 0 or cfg.pair_margin < 0 or cfg.early_stopping_patience < 0:
            raise ConfigError("pairwise_weight, pair_margin and early_stopping_patience must be ≥ 0.")
        if not 0 <= cfg.validation_fraction < 1:
            raise ConfigError(f"validation_fraction: {cfg.validation_fraction} must lie in [0, 1).")
        if cfg.early_stopping_patience and not cfg.validation_fraction:
            raise ConfigError("early_stopping_patience needs validation_fraction > 0: early stopping watches the "
                              "validation prompts' pairwise accuracy.")


@dataclass
class PaletteConfig(CommonConfig):
    """MAP value palette → λ for the fixed reward λᵀr, or a proof it is unreachable (stage `palette`, §6)."""

    name: str = field(default="default", metadata=doc("Output: <run_dir>/palette/<name>/palette.json."))
    targets: dict = field(
        default_factory=dict,
        metadata=doc("Target level per objective: a number (raw reward units), a quantile of π_ref's rewards "
                       "('80%'), 'keep' (π_ref's mean) or {classifier: κ} (c0 + log(1 + κ)). Unnamed ones: keep."),
    )
    overwrite: bool = field(default=False, metadata=doc("Solve again even if palette/<name> is complete."))
    auto_adjust: Literal["none", "interpolate", "greedy"] = field(
        default="none",
        metadata=doc("For an infeasible palette: 'interpolate' (largest feasible step from π_ref towards it) or "
                       "'greedy' (objectives in `priority` order take what they can); 'none' = report and fail."),
    )
    priority: list[str] | None = field(default=None, metadata=doc("Objective order for greedy (default: as listed)."))
    method: Literal["lbfgsb", "cyclic"] = field(
        default="lbfgsb", metadata=doc("Dual solver: L-BFGS-B on all λ, or cyclic (sequential alignment).")
    )
    grouping: Literal["prompt", "pooled"] = field(
        default="prompt",
        metadata=doc("'prompt': normalise q_λ within each prompt's rollouts, as p_λ(y|x), MAP-D and MAP-F do; "
                       "'pooled': one pool over all samples, the MAP paper's estimator (it also reweights prompts)."),
    )
    tol: float = field(default=1e-6, metadata=doc("KKT tolerance, in standard deviations of each objective."))

    def check(self) -> None:
        cfg = self
        from mocd_train.rewards import parse_objectives  # late: imports torch

        names = [o.name for o in parse_objectives(cfg.objectives)]
        for key in list(cfg.targets) + list(cfg.priority or []):
            if key not in names:
                raise unknown_key(key, names, "targets/priority (objective names)")
        if cfg.priority is not None and sorted(cfg.priority) != sorted(names):
            raise ConfigError(f"priority: {cfg.priority} must list every objective once: {names}.")
        if not cfg.name or "/" in cfg.name:
            raise ConfigError(f"name: {cfg.name!r} must be a plain file name.")
        if cfg.tol <= 0:
            raise ConfigError("tol: must be > 0.")


@dataclass
class TeachConfig(SamplingConfig):
    """Decode prompts with a decoding-time teacher and write its outputs as a dataset (stage `teach`)."""

    decoder: Literal["rmod", "cd_uniform", "cd_single", "cd_fixed", "cd_maximin", "best_of_k", "pi_ref", "map_d", "mod",
                     "soup"] = field(default="rmod", metadata=doc(
                         "The teacher (docs/algorithms.md §3–6); see README 'Decoders'.", "what and where"))
    name: str | None = field(default=None, metadata=doc("Output folder teach/<name> (default: the decoder's name).",
                                                        "what and where"))
    split: Literal["train", "heldout"] = field(
        default="train", metadata=doc("Prompts to decode: train (teacher data) or heldout (evaluation).",
                                      "what and where"))
    max_prompts: int | None = field(default=None, metadata=doc("At most this many prompts (balanced by source).",
                                                               "what and where"))
    first_prompt: int = field(
        default=0, metadata=doc("Skip the split's first N prompts: e.g. a validation slice after the evaluation "
                                "prompts, disjoint from them (the order is fixed by the prompt texts).",
                                "what and where"))
    max_new_tokens: int = field(default=64, metadata=doc("T: response length cap.", "sampling (every decoder)"))
    temperature: float = field(default=1.0, metadata=doc("π_ref sampling temperature.", "sampling (every decoder)"))
    top_p: float = field(default=1.0, metadata=doc("π_ref nucleus threshold.", "sampling (every decoder)"))
    batch_size: int = field(default=8, metadata=doc("Prompts decoded together (× K rows).", "sampling (every decoder)"))
    chunk_size: int = field(default=16, metadata=doc("Prompts per shard file: the unit of resumption and seeding.",
                                                     "sampling (every decoder)"))
    num_candidates: int = field(default=4, metadata=doc("K: candidate blocks per step (samples for MAP-D).",
                                                        "block decoders: rmod, cd_*, best_of_k (K also map_d)"))
    block_size: int = field(default=8, metadata=doc("B: tokens per block (Best-of-K uses B = max_new_tokens).",
                                                    "block decoders: rmod, cd_*, best_of_k (K also map_d)"))
    score_with: Literal["value", "reward"] = field(
        default="value", metadata=doc("Candidates scored by the trained value model or by the reward functions.",
                                      "block decoders: rmod, cd_*, best_of_k (K also map_d)"))
    value_model: str | None = field(default=None, metadata=doc("Value model folder (default <run_dir>/value/model).",
                                                               "block decoders: rmod, cd_*, best_of_k (K also map_d)"))
    rmod_lambda: float = field(
        default=1.0, metadata=doc("RMOD's scalar KL trade-off λ (not MAP's weights): large = robust to the worst "
                                  "objective. Also the temperature of selection: sample.", "rmod"))
    selection: Literal["argmax", "sample"] = field(
        default="argmax", metadata=doc("RMOD: keep argmax_k w·V_k (paper) or sample ∝ exp(λ w·V_k).", "rmod"))
    weights_method: Literal["exact", "paper"] = field(
        default="exact", metadata=doc("RMOD weights: exact solver, or the paper's 10-step update (comparison).",
                                      "rmod"))
    objective: str | None = field(default=None, metadata=doc("cd_single: the objective to follow.",
                                                             "cd_single, cd_fixed, best_of_k"))
    cd_weights: list[float] | None = field(
        default=None, metadata=doc("cd_fixed: one weight per objective, in objective order.",
                                   "cd_single, cd_fixed, best_of_k"))
    best_of_k_rule: Literal["uniform", "maximin", "rmod"] = field(
        default="uniform", metadata=doc("best_of_k: how the K full responses are compared.",
                                        "cd_single, cd_fixed, best_of_k"))
    policies: list[str] | None = field(
        default=None, metadata=doc("mod / soup: the per-objective policies — names under <run_dir>/policies or "
                                   "folders (LoRA adapters on one base run as one batched forward).", "mod, soup"))
    mod_weights: list[float] | None = field(
        default=None, metadata=doc("mod / soup: one weight per policy, summing to 1 (MOD: negative ones allowed for "
                                   "reverse_kl and js).", "mod, soup"))
    divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] = field(
        default="reverse_kl", metadata=doc("mod: the f-divergence the policies were trained with (picks the rule).",
                                           "mod, soup"))
    alpha: float = field(default=0.5, metadata=doc("mod: α of the α-divergence rule, in (0, 1].", "mod, soup"))
    jsd_approximation: bool = field(
        default=False, metadata=doc("mod, divergence js: decode with the reverse-KL rule instead (the MOD reference "
                                    "code's substitute; an approximation).", "mod, soup"))
    greedy: bool = field(default=False, metadata=doc("mod / soup: argmax of the combined distribution.", "mod, soup"))
    top_k: int = field(default=0, metadata=doc("mod / soup: sample within the top-k tokens (0: all).", "mod, soup"))
    palette: str | None = field(default=None, metadata=doc("map_d: palette name under <run_dir>/palette or a path.",
                                                           "map_d"))
    overwrite: bool = field(default=False, metadata=doc("Delete teach/<name> and start over.", "what and where"))

    def check(self) -> None:
        super().check()
        from mocd_train.rewards import parse_objectives  # late: imports torch

        names = [o.name for o in parse_objectives(self.objectives)]
        positive(self, "num_candidates", "block_size", "max_new_tokens", "batch_size", "chunk_size")
        if self.max_prompts is not None:
            positive(self, "max_prompts")
        if self.first_prompt < 0:
            raise ConfigError(f"first_prompt: {self.first_prompt} must be ≥ 0.")
        if self.rmod_lambda < 0:
            raise ConfigError("rmod_lambda: must be ≥ 0.")
        if self.decoder == "cd_single" and self.objective not in names:
            raise ConfigError(f"objective: cd_single needs one of {names}, got {self.objective!r}.")
        if self.decoder == "cd_fixed" and (self.cd_weights is None or len(self.cd_weights) != len(names)):
            raise ConfigError(f"cd_weights: cd_fixed needs {len(names)} weights (one per objective {names}), "
                              f"got {self.cd_weights}.")
        if self.decoder in ("mod", "soup"):
            if not self.policies:
                raise ConfigError(f"policies: {self.decoder} combines trained policies; name them, e.g. "
                                  "--policies [helpfulness-dpo, harmlessness-dpo].")
            if self.mod_weights is None or len(self.mod_weights) != len(self.policies):
                raise ConfigError(f"mod_weights: {self.decoder} needs one weight per policy ({len(self.policies)}), "
                                  f"got {self.mod_weights}.")
            if self.decoder == "soup" and self.divergence != "reverse_kl":
                raise ConfigError("divergence: a rewarded soup mixes weights, it has no combination rule; leave it.")
        if self.decoder == "map_d" and not self.palette:
            raise ConfigError("palette: map_d needs a solved palette (recipes/solve_palette.py), e.g. --palette hh-65.")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be > 0 and top_p in (0, 1].")
        if self.backend == "vllm" and self.decoder in ("mod", "soup"):
            raise ConfigError(f"backend: {self.decoder} needs every policy's full next-token distribution at each "
                              "step, which vLLM does not expose; use backend: hf.")


DIVERGENCES = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js": "js_divergence",
               "alpha": "alpha_divergence"}  # ours → TRL's f_divergence_type
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}


@dataclass
class TrainingConfig(FineTuneConfig):
    """Keys shared by the stages that fine-tune a model with TRL (policies, distill)."""

    use_lora: bool = field(default=True, metadata=doc("Train LoRA adapters (else the full model)."))
    merge: bool = field(default=False, metadata=doc("Also save the adapter merged into a full checkpoint."))
    max_steps: int = field(default=-1, metadata=doc("Stop after this many optimiser steps (-1: use epochs)."))


@dataclass
class PolicyConfig(TrainingConfig):
    """A policy trained with TRL for one objective or fixed weights (stage `policies`, docs/algorithms.md §4–6)."""

    method: Literal["sft", "dpo", "grpo", "ppo"] = field(default="dpo", metadata=doc("Training method."))
    objective: str | None = field(default=None, metadata=doc("Train for this one objective..."))
    weights: dict | None = field(
        default=None, metadata=doc("...or for fixed weights {objective: w} on the normalised rewards (MO-DPO, "
                                     "MO-GRPO)..."))
    palette: str | None = field(
        default=None, metadata=doc("...or (GRPO/PPO) for a solved MAP palette (a name under <run_dir>/palette or a "
                                     ".json): MAP-F, reward β·λᵀr on raw rewards, whose optimum is p_λ."))
    divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] = field(
        default="reverse_kl", metadata=doc("DPO's f-divergence regulariser (f-DPO); MOD combines policies by it."))
    alpha: float = field(default=0.5, metadata=doc("α of the α-divergence (divergence: alpha), in (0, 1)."))
    beta: float = field(default=0.1, metadata=doc("KL coefficient β (DPO; GRPO's KL term; PPO's kl_coef)."))
    loss_type: str = field(default="sigmoid", metadata=doc("TRL DPO loss type."))
    pair_margin: float = field(
        default=0.0, metadata=doc("DPO pairs: skip prompts whose best and worst response differ by ≤ this "
                                    "(normalised weighted reward)."))
    sft_dataset: str | None = field(
        default=None, metadata=doc("SFT: a teacher name under <run_dir>/teach, or a dataset folder with "
                                     "prompt/response columns."))
    name: str | None = field(default=None, metadata=doc("Output folder policies/<name> (default from the method)."))
    num_generations: int = field(default=4, metadata=doc("GRPO: completions per prompt (group size)."))
    max_completion_length: int = field(default=48, metadata=doc("GRPO/PPO: completion length cap."))
    max_prompts: int | None = field(default=None, metadata=doc("GRPO/PPO: at most this many train prompts."))
    num_ppo_epochs: int = field(default=4, metadata=doc("PPO: optimisation passes over each rollout batch."))
    num_mini_batches: int = field(default=1, metadata=doc("PPO: minibatches per rollout batch."))
    use_vllm: bool = field(
        default=False, metadata=doc("GRPO: generate the completions with vLLM through TRL (TRL 1.12 generates "
                                      "with vLLM 0.19–0.27.1, on CUDA GPUs). TRL's PPO has no vLLM generation."))
    vllm_mode: Literal["colocate", "server"] = field(
        default="colocate", metadata=doc("GRPO + vLLM: `colocate` runs vLLM inside each training process; `server` "
                                           "talks to `trl vllm-serve --model <policy>` started beforehand."))
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata=doc("GRPO + vLLM, colocate: the share of GPU memory vLLM may take."))
    vllm_server_base_url: str | None = field(
        default=None, metadata=doc("GRPO + vLLM, server: the server's URL (default http://0.0.0.0:8000)."))
    overwrite: bool = field(default=False, metadata=doc("Delete policies/<name> and start over."))

    def check(self) -> None:
        cfg = self
        from mocd_train.rewards import parse_objectives  # late: imports torch

        names = [o.name for o in parse_objectives(cfg.objectives)]
        positive(cfg, "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "lora_r",
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
                raise unknown_key(cfg.objective, names, "objective")
            for key, w in (cfg.weights or {}).items():
                if key not in names:
                    raise unknown_key(key, names, "weights")
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
        if cfg.use_vllm and cfg.method != "grpo":
            raise ConfigError(f"use_vllm: only GRPO generates through vLLM (TRL's {cfg.method.upper()} trainer has no "
                              "vLLM generation); set use_vllm: false.")
        if not 0 < cfg.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization: {cfg.vllm_gpu_memory_utilization} must lie in (0, 1].")


@dataclass
class DistillConfig(TrainingConfig):
    """Distil teacher datasets into one student checkpoint that loads without mocd_train (stage `distill`, §7)."""

    teachers: dict = field(
        default_factory=dict, metadata=doc("{teacher name under <run_dir>/teach (or a dataset folder): weight}; a "
                                             "weight w ≤ 1 keeps that share of the teacher's rows (seeded)."))
    student: str | None = field(default=None, metadata=doc("The student to fine-tune (default: `model`, π_ref)."))
    name: str | None = field(default=None, metadata=doc("Output folder distill/<name> (default: the teachers)."))
    deduplicate: bool = field(default=True, metadata=doc("Drop repeated (prompt, response) pairs across teachers."))
    min_worst_case: float | str | None = field(
        default=None, metadata=doc("Keep rows whose normalised worst-case reward min_g r̃_g is at least this number "
                                     "or quantile ('50%')."))
    heldout_fraction: float = field(
        default=0.1, metadata=doc("Teacher prompts held out to measure the student's likelihood of them."))
    loss: Literal["sft", "token_kl"] = field(
        default="sft", metadata=doc("sft: likelihood of the teacher's responses; token_kl (one MOD teacher): KL to "
                                      "MOD's combined next-token distribution at every response token."))
    overwrite: bool = field(default=False, metadata=doc("Delete distill/<name> and start over."))

    def check(self) -> None:
        cfg = self
        positive(cfg, "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "lora_r",
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


@dataclass
class EvaluateConfig(CommonConfig):
    """Compare methods decoded on the same held-out prompts: table, plots, HTML report, W&B (stage `evaluate`, §8)."""

    methods: list[str] = field(
        default_factory=list, metadata=doc("Teacher datasets under <run_dir>/teach to compare (decode policies and "
                                             "students with `teach.py --decoder pi_ref --model ...`)."))
    reference: str = field(default="eval-pi_ref", metadata=doc("The π_ref dataset every method is paired with."))
    baselines: list[str] = field(
        default_factory=list, metadata=doc("Methods every other method is also compared with, e.g. "
                                             "[eval-cd_uniform]: the report states each difference in mean per-prompt "
                                             "worst case with its interval and whether it is significant."))
    fronts: dict | None = field(
        default=None, metadata=doc("Families of methods whose Pareto hypervolumes are compared with bootstrap "
                                     "intervals, e.g. {mod: [eval-mod-0.25, eval-mod-0.5], soup: [...]}."))
    palette_targets: dict | None = field(
        default=None, metadata=doc("Palette-guided methods and their palettes, e.g. {eval-map_f: hh-65}: the report "
                                     "sets each one's realised gain over the reference against the palette's target "
                                     "gain, with an interval."))
    note: str = field(default="", metadata=doc("A line printed at the top of the report (e.g. 'smoke-sized run')."))
    export_dir: str | None = field(
        default=None, metadata=doc("Also copy the report, tables, plots, value metrics and step timings here (e.g. "
                                     "results/<preset>); the pipeline refreshes its pipeline.json when it ends."))
    name: str = field(default="eval", metadata=doc("Output folder <run_dir>/<name>."))
    samples: int = field(default=3, metadata=doc("Sample responses per method in the HTML report."))
    overwrite: bool = field(default=True, metadata=doc("Re-evaluate even if a report exists (it is cheap)."))

    def check(self) -> None:
        cfg = self
        if not cfg.methods:
            raise ConfigError("methods: name the teacher datasets to compare, e.g. "
                              "--methods '[eval-rmod, eval-cd_uniform]'.")


STAGES: dict[str, type[CommonConfig]] = {"rollouts": RolloutsConfig, "value": ValueConfig, "palette": PaletteConfig,
                                         "teach": TeachConfig, "policies": PolicyConfig, "distill": DistillConfig,
                                         "evaluate": EvaluateConfig}



# Keys whose change does not alter a stage's outputs: a resumed run may use different values. The run directory and
# the keys that name models, datasets and files are among them because stages compare what those contain
# (`Stage.require`), not how their paths are spelled: a moved or copied run stays valid.
RESUME_FREE_KEYS = {"run_dir", "report_to", "device", "cache_dir", "score_batch_size", "overwrite", "eval_batch_size",
                    "logging_steps", "save_steps", "gradient_checkpointing", "model", "backbone", "student",
                    "value_model", "prompts_file", "sft_dataset", "export_dir", "vllm_args"}


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (outside RESUME_FREE_KEYS) whose values differ between a saved and a current config."""
    keys = (set(saved) | set(current)) - RESUME_FREE_KEYS
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def build_config(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Type-check `values` against the dataclass `cls` and run its validation."""
    hints = typing.get_type_hints(cls)
    known = fields_of(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise unknown_key(key, list(known), where)
        kwargs[key] = coerce(key, value, hints[key])
    cfg = cls(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg: CommonConfig) -> None:
    """Checks that need more than a type: objective names, files, ranges."""
    from mocd_train.rewards import parse_objectives  # late: the reward registry imports torch; --help needs neither

    parse_objectives(cfg.objectives)
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device: {cfg.device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    cfg.check()
