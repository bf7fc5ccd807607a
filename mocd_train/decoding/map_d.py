"""MAP-D (docs/algorithms.md §6): per prompt, k samples from π_ref, one kept with probability softmax(λᵀr) — a
sampling-importance-resampling approximation of p_λ ∝ π_ref · exp(λᵀr) that needs no training."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mocd_train.data import sample_responses
from mocd_train.decoding.engine import Decoded, in_batches
from mocd_train.decoding.weights import check_finite_values
from mocd_train.errors import NonFiniteError
from mocd_train.rewards import RewardSet


def resample(rewards: torch.Tensor, lam: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """rewards [N, k, m] (raw units, as λ was solved on), λ [m] → chosen index [N], drawn ∝ exp(λᵀr)."""
    if not bool(torch.isfinite(lam).all()):
        raise NonFiniteError(f"MAP-D: λ = {lam.tolist()} is not finite; solve the palette again.")
    check_finite_values(rewards, "MAP-D candidate rewards")
    logits = rewards.double() @ lam.double().to(rewards.device)
    where = generator.device if generator is not None else rewards.device  # the draw runs where its generator is
    probs = torch.softmax(logits, dim=-1).to(where)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).cpu()


@dataclass
class MapD:
    policy: object
    tokenizer: object
    rewards: RewardSet
    lam: torch.Tensor  # [m], raw reward units
    k: int = 16
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    system_prompt: str | None = None
    batch_size: int = 4
    name: str = "map_d"
    params: dict = field(default_factory=dict)

    def generate(self, prompts: list[str], generator: torch.Generator | None = None, progress=None) -> list[Decoded]:
        """One response per prompt; `values` holds its raw reward vector, the trace the k candidates' rewards and
        their selection probabilities. Sampling draws from the global torch RNG (seeded by the caller)."""
        return in_batches(prompts, self.batch_size, lambda batch: self._batch(batch, generator), progress)

    def _batch(self, prompts, generator):
        t0 = time.perf_counter()
        rows = sample_responses(self.policy, self.tokenizer, prompts, self.k, self.max_new_tokens, self.temperature,
                                self.top_p, self.system_prompt)
        texts = [p for p in prompts for _ in range(self.k)]
        scores = self.rewards.score(texts, [r["response"] for r in rows]).view(len(prompts), self.k, -1)
        choice = resample(scores, self.lam, generator)
        weights = torch.softmax(scores.double() @ self.lam.double(), -1)
        seconds = (time.perf_counter() - t0) / len(prompts)
        out = []
        for i, j in enumerate(choice.tolist()):
            row = rows[i * self.k + j]
            tokens = sum(rows[i * self.k + c]["num_response_tokens"] for c in range(self.k))
            out.append(Decoded(prompts[i], row["response"], row["response_ids"], row["finished"],
                               scores[i, j].tolist(),
                               [{"block": 0, "candidate_rewards": scores[i].tolist(), "chosen": j,
                                 "selection_weights": weights[i].tolist()}],
                               {"policy_tokens": tokens, "value_tokens": 0, "seconds": seconds}))
        return out
