"""Decoders on the block engine, one `Decoder` interface for all of them (MAP-D and MOD implement it too).

RMOD (worst-case weights, docs/algorithms.md §3), CD-uniform / CD-single(g) / CD-fixed(w) (fixed weights), CD-maximin
(argmax_k min_g V), Best-of-K (the same rules with one block of B = T), and π_ref (one plain sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from mocd_train.data import rollouts_config
from mocd_train.decoding.backends import VLLMBackend
from mocd_train.decoding.engine import BlockEngine, Decoded, Rule
from mocd_train.decoding.map_d import MapD
from mocd_train.decoding.mod import Mod, PolicySet
from mocd_train.decoding.weights import select_block, worst_case_weights
from mocd_train.errors import ConfigError
from mocd_train.models import adapter_of, policy_dir
from mocd_train.palette import load_palette
from mocd_train.policies import soup_model
from mocd_train.rundir import stage_dir
from mocd_train.values import ValueModel


class Decoder(Protocol):
    name: str
    params: dict

    def generate(self, prompts: list[str], generator: torch.Generator | None = None, progress=None) -> list[Decoded]:
        ...


def rmod_rule(kappa: float, selection: str = "argmax", method: str = "exact") -> Rule:
    """RMOD: solve w* = argmin_w log mean_k exp(κ w·V_k) per prompt, keep argmax_k w*·V_k (or sample ∝ exp)."""

    def rule(values, generator):
        sol = worst_case_weights(values, kappa, method=method)
        chosen = select_block(values, sol.weights, selection, kappa, generator)
        return chosen, [{"weights": w, "gap": gp} for w, gp in zip(sol.weights.tolist(), sol.gap.tolist())]

    return rule


def fixed_weights_rule(weights: list[float]) -> Rule:
    """CD with fixed weights: uniform, one objective (e_g) or any w."""
    w = torch.tensor(weights, dtype=torch.float64)

    def rule(values, generator):
        ws = w.to(values.device).expand(values.shape[0], -1)
        return select_block(values, ws), [{"weights": weights} for _ in range(values.shape[0])]

    return rule


def maximin_rule() -> Rule:
    """CD-maximin: the candidate whose worst objective is best (docs/algorithms.md §3: the natural large-κ
    comparison)."""

    def rule(values, generator):
        worst = values.min(-1)
        chosen = worst.values.argmax(-1)
        return chosen, [{"worst_objective": int(worst.indices[i, c])} for i, c in enumerate(chosen.tolist())]

    return rule


def first_rule() -> Rule:
    """π_ref: keep candidate 0 (run with K = 1 and B = T it is one plain sample)."""

    def rule(values, generator):
        return torch.zeros(values.shape[0], dtype=torch.long), [{} for _ in range(values.shape[0])]

    return rule


DECODERS = ("rmod", "cd_uniform", "cd_single", "cd_fixed", "cd_maximin", "best_of_k", "pi_ref")


@dataclass
class BlockDecoder:
    name: str
    engine: BlockEngine
    rule: Rule
    params: dict = field(default_factory=dict)

    def generate(self, prompts, generator=None, progress=None) -> list[Decoded]:
        return self.engine.generate(prompts, self.rule, generator, progress)


def block_rule(decoder: str, num_objectives: int, *, rmod_lambda: float = 1.0, selection: str = "argmax",
               weights_method: str = "exact", objective_index: int = 0, weights: list[float] | None = None,
               best_of_k_rule: str = "uniform") -> Rule:
    """The selection rule of a named decoder (Best-of-K takes `best_of_k_rule` ∈ uniform | maximin | rmod)."""
    g = num_objectives
    if decoder == "best_of_k":
        decoder = {"uniform": "cd_uniform", "maximin": "cd_maximin", "rmod": "rmod"}[best_of_k_rule]
    if decoder == "rmod":
        return rmod_rule(rmod_lambda, selection, weights_method)
    if decoder == "cd_uniform":
        return fixed_weights_rule([1.0 / g] * g)
    if decoder == "cd_single":
        return fixed_weights_rule([1.0 if i == objective_index else 0.0 for i in range(g)])
    if decoder == "cd_fixed":
        if weights is None or len(weights) != g:
            raise ValueError(f"cd_fixed needs {g} weights, got {weights}.")
        return fixed_weights_rule(list(weights))
    if decoder == "cd_maximin":
        return maximin_rule()
    if decoder == "pi_ref":
        return first_rule()
    raise ValueError(f"unknown decoder {decoder!r}; known: {', '.join(DECODERS)}.")


def make_decoder(cfg, policy, tokenizer, reward_set, objectives: list[str]) -> Decoder:
    """The decoder a TeachConfig describes, on this policy; loads the value model or palette it needs."""
    params = {"K": cfg.num_candidates, "B": cfg.block_size, "T": cfg.max_new_tokens, "temperature": cfg.temperature,
              "top_p": cfg.top_p}
    if cfg.decoder in ("mod", "soup"):
        return _mod_decoder(cfg, policy, tokenizer)
    if cfg.decoder == "map_d":
        palette = load_palette(cfg.palette, objectives, cfg.run_dir)
        return MapD(policy, tokenizer, reward_set, torch.tensor(palette["lam"]), cfg.num_candidates,
                    cfg.max_new_tokens, cfg.temperature, cfg.top_p, _system_prompt(cfg), cfg.batch_size,
                    params={**params, "palette": palette["path"], "lam": palette["lam"]})
    k, b = cfg.num_candidates, cfg.block_size
    if cfg.decoder == "best_of_k":
        b = cfg.max_new_tokens
    if cfg.decoder == "pi_ref":
        k, b = 1, cfg.max_new_tokens
    value = vtok = None
    backend = policy if isinstance(policy, VLLMBackend) else None
    if cfg.decoder != "pi_ref" and cfg.score_with == "value":
        path = Path(cfg.value_model or stage_dir(cfg.run_dir, "value") / "model")
        value, vtok = ValueModel.load(path, policy.device, policy.dtype, objectives, cfg.cache_dir)
        params["value_model"] = str(path)
    elif cfg.decoder != "pi_ref":
        params["scored_by"] = "reward functions"
    try:
        engine = BlockEngine(None if backend else policy, tokenizer, value, vtok,
                             reward_set if value is None and k > 1 else None, num_candidates=k, block_size=b,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             system_prompt=_system_prompt(cfg), batch_size=cfg.batch_size, backend=backend)
    except ValueError as e:
        raise ConfigError(f"value_model: {e}") from None
    params.update(K=k, B=b)
    if cfg.decoder == "rmod":
        params.update(rmod_lambda=cfg.rmod_lambda, selection=cfg.selection, weights_method=cfg.weights_method)
    elif cfg.decoder == "cd_single":
        params["objective"] = cfg.objective
    elif cfg.decoder == "cd_fixed":
        params["weights"] = cfg.cd_weights
    elif cfg.decoder == "best_of_k":
        params["rule"] = cfg.best_of_k_rule
    rule = block_rule(cfg.decoder, len(objectives), rmod_lambda=cfg.rmod_lambda, selection=cfg.selection,
                      weights_method=cfg.weights_method,
                      objective_index=objectives.index(cfg.objective) if cfg.objective in objectives else 0,
                      weights=cfg.cd_weights, best_of_k_rule=cfg.best_of_k_rule)
    return BlockDecoder(cfg.decoder, engine, rule, params)


def _mod_decoder(cfg, policy, tokenizer):
    """MOD over the named policies — LoRA adapters on π_ref as one batched model, else full models — or their
    rewarded soup, decoded by the same sampler (a soup is MOD with one policy)."""
    paths = [policy_dir(cfg.run_dir, p) for p in cfg.policies]
    adapters = [adapter_of(p) for p in paths]
    params = {"T": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
              "greedy": cfg.greedy, "policies": [str(p) for p in paths], "weights": cfg.mod_weights}
    weights, rule = cfg.mod_weights, cfg.divergence
    if cfg.decoder == "soup":
        if not all(adapters):
            raise ConfigError("soup: every policy must be a LoRA adapter (a soup mixes ΔW = B·A).")
        model, _ = soup_model({f"p{i}": a for i, a in enumerate(adapters)},
                              {f"p{i}": w for i, w in enumerate(weights)}, cfg.cache_dir)
        policies, weights = PolicySet.from_models([model.to(policy.device, policy.dtype)]), [1.0]
    else:
        policies = PolicySet.for_policies(paths, policy, rule, cfg.cache_dir)
        params["batched_adapters"] = policies.adapters is not None
    params.update(rule=rule, alpha=cfg.alpha, jsd_approximation=cfg.jsd_approximation)
    return Mod(policies, tokenizer, weights, rule, cfg.alpha, cfg.jsd_approximation, cfg.greedy, cfg.temperature,
               cfg.top_k, cfg.top_p, cfg.max_new_tokens, _system_prompt(cfg), cfg.batch_size, name=cfg.decoder,
               params=params)


def _system_prompt(cfg) -> str | None:
    """The system prompt π_ref's rollouts used (the value model learned on that formatting)."""

    return rollouts_config(cfg.run_dir).get("system_prompt")
