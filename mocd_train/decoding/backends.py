"""Sampling backends: π_ref's side of the block decoders (docs/architecture.md, "The fast path").

A backend holds branches of prompts and samples B more tokens for every branch at a time; the engine scores the
candidates and tells it which branch of each prompt to keep. Selection rules and value scoring never see the
backend, so RMOD, the CD baselines, Best-of-K and π_ref run on any of them:
    open(prompt ids, K) · sample(B) → tokens, mask, alive · keep(winners, survivors) · cost
`HFBackend` is the cached Hugging Face engine (MOD, which needs every policy's full next-token distribution, runs on
Hugging Face models only: decoding/mod.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from mocd_train.tensors import left_pad, positions

_SYNC_EVERY = 4  # sampling steps between checks that some branch is still alive (each check syncs with the device)


class SamplingBackend(Protocol):
    cost: dict

    def open(self, prompt_ids: list[list[int]], k: int) -> None:
        """Start K branches for each prompt (token ids, chat-formatted)."""

    def sample(self, b: int, last: bool, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """B more tokens for every branch of every open prompt → tokens and mask [rows, ≤B] (rows = prompt-major
        branches) and alive [rows] (False once a branch emitted a stop token). `last`: no block follows."""

    def keep(self, winners: torch.Tensor, survivors: list[int]) -> None:
        """Branch winners[j] (a row) continues prompt j; only the prompts at `survivors` (indices into the open
        prompts) stay open."""


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(logits / T), restricted to the top-p nucleus; exponential-race sampling so the
    draw consumes exactly one uniform per vocabulary entry (the same stream whatever computed the logits)."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_lp, order = logp.sort(-1, descending=True)
        drop = sorted_lp.exp().cumsum(-1) - sorted_lp.exp() >= top_p  # keep the smallest set reaching top_p
        logp = logp.scatter(-1, order, sorted_lp.masked_fill(drop, -float("inf")))
    noise = torch.empty_like(logp).exponential_(generator=generator)
    return (logp - noise.log()).argmax(-1)


class HFBackend:
    """A Hugging Face causal LM with a KV cache: each prompt is prefilled once and its K branches share the prefill;
    the kept branch's cache is copied into the K slots. `reuse_cache=False` re-encodes every prefix at each block
    (the naive loop the tests compare against)."""

    def __init__(self, policy, pad: int, stop: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                 reuse_cache: bool = True):
        self.policy, self.pad, self.stop = policy, pad, stop
        self.temperature, self.top_p, self.reuse_cache = temperature, top_p, reuse_cache
        self.cost = {"policy_tokens": 0, "prefill_tokens": 0}

    def open(self, prompt_ids, k):
        self.prompts, self.k = [list(p) for p in prompt_ids], k
        self.kept = [[] for _ in prompt_ids]  # tokens kept so far, per open prompt
        self.cache = self.logits = self.mask = None
        self.cost = {"policy_tokens": 0, "prefill_tokens": 0}

    def sample(self, b, last, generator):
        dev, k = self.policy.device, self.k
        if self.cache is None or not self.reuse_cache:  # (re-)encode the open prompts' prefixes
            ids, pmask = left_pad([p + r for p, r in zip(self.prompts, self.kept)], self.pad, dev)
            self.cache, logits = self._forward(ids, pmask, None)
            self.cost["prefill_tokens"] += int(pmask.sum())
            self.cache.batch_repeat_interleave(k)
            self.logits, self.mask = logits.repeat_interleave(k, 0), pmask.repeat_interleave(k, 0)
        rows = len(self.prompts) * k
        toks = torch.full((rows, b), self.pad, dtype=torch.long, device=dev)
        tmask = torch.zeros((rows, b), dtype=torch.long, device=dev)
        alive = torch.ones(rows, dtype=torch.bool, device=dev)
        for s in range(b):
            nxt = torch.where(alive, sample_tokens(self.logits, self.temperature, self.top_p, generator),
                              torch.full_like(alive, self.pad, dtype=torch.long))
            toks[:, s], tmask[:, s] = nxt, alive.long()
            alive = alive & ~torch.isin(nxt, self.stop)
            self.cost["policy_tokens"] += rows
            if not (last and s == b - 1):  # the logits after a block's last token seed the next block
                self.mask = torch.cat([self.mask, tmask[:, s : s + 1]], 1)
                self.cache, self.logits = self._forward(nxt[:, None], self.mask, self.cache)
            if s % _SYNC_EVERY == _SYNC_EVERY - 1 and not bool(alive.any()):  # one host sync per few steps
                toks, tmask = toks[:, : s + 1], tmask[:, : s + 1]
                break
        self._block = (toks, tmask)
        return toks, tmask, alive

    def keep(self, winners, survivors):
        toks, tmask = self._block
        for j, w in enumerate(winners.tolist()):
            self.kept[j] += toks[w][tmask[w].bool()].tolist()
        self.prompts = [self.prompts[j] for j in survivors]
        self.kept = [self.kept[j] for j in survivors]
        if survivors and self.reuse_cache:  # copy each surviving winner's cache into its K slots
            rows = winners[torch.tensor(survivors, device=winners.device, dtype=torch.long)].repeat_interleave(self.k)
            self.cache.batch_select_indices(rows)
            self.logits, self.mask = self.logits[rows], self.mask[rows]

    def _forward(self, ids, mask, cache):
        """One forward from the cache; only the last position's logits are computed (`logits_to_keep=1`: a prefill
        of L tokens would otherwise build an L × vocabulary tensor it throws away)."""
        from transformers import DynamicCache  # heavy

        out = self.policy(input_ids=ids, attention_mask=mask, position_ids=positions(mask, ids.shape[1]),
                          past_key_values=cache if cache is not None else DynamicCache(config=self.policy.config),
                          use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1]
