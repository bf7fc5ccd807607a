"""The blockwise sampler behind RMOD, the CD baselines and Best-of-K (docs/architecture.md, "The fast path").

Per batch of prompts: a sampling backend (decoding/backends.py) opens K branches per prompt and samples B tokens for
each; the value model scores only the new tokens from its own cache; a selection rule picks one branch per prompt;
the backend and the scorer (decoding/scoring.py) continue from the winner. Prompts whose response ended leave the batch.
`reuse_cache=False` runs the same loop but re-encodes every prefix at each block (the naive baseline, and the
reference the tests compare against).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mocd_train.data import chat_texts, eos_ids, pad_id
from mocd_train.decoding import scoring
from mocd_train.decoding.backends import HFBackend, SamplingBackend
from mocd_train.decoding.weights import check_finite_values
from mocd_train.errors import ConfigError, WeightSolveError
from mocd_train.values import same_tokenizer


@dataclass
class Decoded:
    prompt: str
    text: str
    token_ids: list[int]
    finished: bool
    values: list[float] | None  # the kept branch's last value (normalised units), or its scores
    trace: list[dict] = field(default_factory=list)  # per block: candidates' values, weights, chosen, ...
    cost: dict = field(default_factory=dict)


# A selection rule maps candidate values [n, K, G] to the chosen branch [n] and per-prompt trace entries.
Rule = Callable[[torch.Tensor, torch.Generator | None], tuple[torch.Tensor, list[dict]]]


def in_batches(prompts: list[str], batch_size: int, decode: Callable[[list[str]], list[Decoded]],
               progress: Callable[[int], None] | None = None) -> list[Decoded]:
    """The one batching loop every decoder shares: `decode` each slice of prompts, report progress."""
    out: list[Decoded] = []
    for i in range(0, len(prompts), batch_size):
        out += decode(prompts[i : i + batch_size])
        if progress:
            progress(len(out))
    return out


class BlockEngine:
    def __init__(self, policy, tokenizer, value_model=None, value_tokenizer=None, reward_set=None, *,
                 num_candidates: int = 4, block_size: int = 8, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, system_prompt: str | None = None, batch_size: int = 8,
                 reuse_cache: bool = True, ignore_eos: bool = False, backend: SamplingBackend | None = None):
        if value_model is None and reward_set is None and num_candidates > 1:
            raise ValueError("the engine needs a value model or reward functions to score candidates.")
        self.policy, self.tok = policy, tokenizer
        self.value, self.vtok, self.rewards = value_model, value_tokenizer, reward_set
        self.k, self.b, self.t = num_candidates, block_size, max_new_tokens
        self.temperature, self.top_p, self.system_prompt = temperature, top_p, system_prompt
        self.batch_size, self.reuse_cache = batch_size, reuse_cache
        if backend is None:  # the Hugging Face policy; ignore_eos (benchmarks): every branch runs the full T tokens
            stop = eos_ids(policy, tokenizer)
            pad = pad_id(tokenizer, stop)
            backend = HFBackend(policy, pad, torch.tensor([] if ignore_eos else stop, dtype=torch.long,
                                                          device=policy.device), temperature, top_p, reuse_cache)
        self.backend, self.device, self.pad = backend, backend.device, backend.pad
        self.stop_set = set(backend.stop_ids)
        self.shared = value_model is not None and value_model.meta.shares_policy_tokenizer
        if value_model is not None:
            if value_tokenizer is None:
                raise ValueError("pass the value model's tokenizer (ValueModel.load returns it).")
            if self.shared and not same_tokenizer(tokenizer, value_tokenizer):
                raise ValueError("the value model was trained on another policy's token ids (its tokenizer differs "
                                 "from this policy's); train a value model on this policy's rollouts.")
            if self.shared and value_model.meta.system_prompt != system_prompt:
                raise ValueError(f"the value model read prompts with the system prompt "
                                 f"{value_model.meta.system_prompt!r}, the policy is prompted with {system_prompt!r}; "
                                 "they share one cache, so they must match (train the value model on these rollouts).")
        if value_model is None:
            self.scorer = (scoring.RewardScorer(tokenizer, reward_set, self.stop_set) if reward_set is not None
                           else scoring.NoScorer())
        else:
            kind = (scoring.ReencodingScorer if not reuse_cache else
                    scoring.SharedCacheScorer if self.shared else scoring.RetokenizingScorer)
            self.scorer = kind(value_model, value_tokenizer, tokenizer, self.stop_set, self.pad)

    @torch.no_grad()
    def generate(self, prompts: list[str], rule: Rule, generator: torch.Generator | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Decoded]:
        return in_batches(prompts, self.batch_size, lambda batch: self._batch(batch, rule, generator), progress)

    # -------------------------------------------------------------------------------------------------- batch

    def _batch(self, prompts: list[str], rule: Rule, generator) -> list[Decoded]:
        t0 = time.perf_counter()
        n, k, dev = len(prompts), self.k, self.device
        prompt_ids = [self.tok(t, add_special_tokens=False)["input_ids"]
                      for t in chat_texts(self.tok, prompts, self.system_prompt)]
        limit = self.value.max_positions if self.shared else None
        for p, ids in enumerate(prompt_ids):  # the shared cache cannot be cut: refuse what would overflow it
            if limit is not None and len(ids) + self.t > limit:
                raise ConfigError(f"prompt {p} ({prompts[p][:60]!r}) has {len(ids)} tokens; with max_new_tokens "
                                  f"{self.t} it exceeds the value model's {limit} positions. Shorten the prompt or "
                                  "lower max_new_tokens.")
        responses: list[list[int]] = [[] for _ in range(n)]
        finished = [False] * n
        traces: list[list[dict]] = [[] for _ in range(n)]
        last_values: list[list[float] | None] = [None] * n
        active = list(range(n))
        self.backend.open(prompt_ids, k)
        self.scorer.open(prompts, prompt_ids)
        produced = 0
        while active and produced < self.t:
            b = min(self.b, self.t - produced)
            toks, tmask, alive = self.backend.sample(b, produced + b >= self.t, generator)
            # score the candidates, pick one per prompt
            values = self.scorer.score([responses[p] for p in active], toks, tmask, k)
            check_finite_values(values, "candidate values from the " + ("value model" if self.value is not None
                                                                        else "reward functions"),
                                rows=[f"prompt {p} ({prompts[p][:60]!r}), block {len(traces[p])}" for p in active],
                                objectives=self._objectives())
            try:
                chosen, info = rule(values, generator)
            except WeightSolveError as e:
                names = [f"prompt {active[r]} ({prompts[active[r]][:60]!r})" for r in e.rows[:5]]
                raise WeightSolveError(f"{e} Prompts: {', '.join(names)}; block {len(traces[active[0]])}.",
                                       e.rows) from None
            chosen = chosen.to(dev)
            winners = torch.arange(len(active), device=dev) * k + chosen
            keep = []  # one host copy of the block, then Python lists
            rows, masks, ended = toks.tolist(), tmask.tolist(), (~alive).tolist()
            for j, (p, c, vals) in enumerate(zip(active, chosen.tolist(), values.tolist())):
                w = j * k + c
                responses[p] += [t for t, m in zip(rows[w], masks[w]) if m]
                last_values[p] = vals[c]
                traces[p].append({"block": len(traces[p]), "values": vals, "chosen": c, **info[j]})
                if ended[w]:
                    finished[p] = True
                else:
                    keep.append(j)
            produced += toks.shape[1]
            active = [active[j] for j in keep]
            self.backend.keep(winners, keep)
            self.scorer.keep(winners, keep)
        cost = self.backend.cost | self.scorer.cost
        seconds = time.perf_counter() - t0
        outs = []
        for p in range(n):
            ids = [t for t in responses[p] if t not in self.stop_set]
            outs.append(Decoded(prompts[p], self.tok.decode(ids, skip_special_tokens=True).strip(), ids, finished[p],
                                last_values[p], traces[p], {**{c: v / n for c, v in cost.items()},
                                                            "seconds": seconds / n, "batch_prompts": n}))
        return outs

    def _objectives(self) -> list[str] | None:
        if self.value is not None:
            return self.value.meta.objectives
        return getattr(self.rewards, "names", None)
