"""G objectives scored together, with the per-objective normalisation fitted on the reference rollouts."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mocd_train.rewards.base import ObjectiveSpec, RewardFunction, build_reward, parse_objectives


@dataclass
class Normalizer:
    """z-score per objective: r̃ = (r − mean) / std, with stats from π_ref's rollouts, applied everywhere."""

    objectives: list[str]
    mean: list[float]
    std: list[float]
    method: str = "zscore"
    count: int = 0

    MIN_STD = 1e-6

    @classmethod
    def fit(cls, objectives: list[str], raw: torch.Tensor, method: str = "zscore") -> "Normalizer":
        if method == "none":
            g = len(objectives)
            return cls(objectives, [0.0] * g, [1.0] * g, method, len(raw))
        mean, std = raw.double().mean(0), raw.double().std(0)
        for name, s, m in zip(objectives, std.tolist(), mean.tolist()):
            if s < 1e-3 * max(1.0, abs(m)):
                warnings.warn(f"objective {name!r} is nearly constant on the reference rollouts (std {s:.2e}); "
                              "it carries no signal and will attract worst-case weight. Consider dropping it.",
                              stacklevel=2)
        return cls(objectives, mean.tolist(), std.clamp(min=cls.MIN_STD).tolist(), method, len(raw))

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=raw.dtype, device=raw.device)
        std = torch.tensor(self.std, dtype=raw.dtype, device=raw.device)
        return (raw - mean) / std

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Normalizer":
        return cls(**json.loads(Path(path).read_text()))


class RewardSet:
    """Scores [N, G] raw rewards in batches; `normalizer` (when set) maps them to the normalised scale."""

    def __init__(self, functions: list[RewardFunction], normalizer: Normalizer | None = None, batch_size: int = 64):
        self.functions, self.batch_size = functions, batch_size
        self.names = [f.name for f in functions]
        self.normalizer = normalizer
        if normalizer is not None and normalizer.objectives != self.names:
            raise ValueError(f"normalisation stats are for objectives {normalizer.objectives}, "
                             f"but the reward set has {self.names}; refit them (re-run the rollouts stage).")

    @classmethod
    def from_config(cls, objectives: list, device="cpu", cache_dir: str | None = None, batch_size: int = 64,
                    normalizer: Normalizer | None = None) -> "RewardSet":
        specs: list[ObjectiveSpec] = parse_objectives(objectives)
        return cls([build_reward(s, device, cache_dir) for s in specs], normalizer, batch_size)

    def score(self, prompts: list[str], responses: list[str], normalize: bool = False) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses.")
        cols = []
        for fn in self.functions:
            parts = [fn(prompts[i : i + self.batch_size], responses[i : i + self.batch_size])
                     for i in range(0, len(prompts), self.batch_size)]
            col = torch.cat([torch.as_tensor(p, dtype=torch.float).reshape(-1) for p in parts]) if parts \
                else torch.zeros(0)
            if col.numel() != len(prompts):
                raise ValueError(f"scorer {fn.name!r} returned {col.numel()} scores for {len(prompts)} texts.")
            bad = (~torch.isfinite(col)).nonzero().flatten()
            if len(bad):
                i = int(bad[0])
                raise ValueError(f"scorer {fn.name!r} returned {col[i].item()} for item {i} "
                                 f"(prompt {prompts[i][:80]!r}, response {responses[i][:80]!r}); "
                                 f"{len(bad)} non-finite score(s) in all. Fix the scorer or filter the inputs.")
            cols.append(col)
        raw = torch.stack(cols, dim=1) if cols else torch.zeros(len(prompts), 0)
        if normalize:
            if self.normalizer is None:
                raise ValueError("normalize=True needs normalisation stats (the rollouts stage writes them).")
            return self.normalizer(raw)
        return raw
