"""Candidate scorers: the value side of the block decoders (docs/architecture.md, "The fast path").

A scorer follows the open prompts the way a sampling backend does:
    open(prompts, policy prompt ids) · score(kept responses, block tokens, mask) → values [n, K, G] · keep(...)
and reports `cost["value_tokens"]`. Which one the engine uses depends on the value model:
- `SharedCacheScorer`: the value model reads the policy's token ids; one cache, extended by the B new tokens.
- `RetokenizingScorer`: the value model has its own tokenizer (the paper setup: a GPT-2 reward-model body beside a
  Gemma policy). Each candidate's text is re-tokenised in one batched call, only the ids after the longest prefix it
  shares with the kept branch's ids are encoded, and the kept branch's cache entries past that prefix are masked off
  — O(B) value tokens per candidate per block instead of the whole prefix, with the values of a full re-encoding.
- `ReencodingScorer`: every prefix in full at every block (the naive loop; the reference the tests compare against).
- `RewardScorer`: reward functions on the decoded text (the CD baselines' and Best-of-K's oracle).
"""

from __future__ import annotations

import torch

from mocd_train.tensors import left_pad
from mocd_train.values import ValueState, block_end_values, value_prompt_ids, value_response_ids


def candidate_rows(responses: list[list[int]], toks: torch.Tensor, tmask: torch.Tensor, k: int) -> list[list[int]]:
    """Each candidate's whole response so far (kept tokens + its block), rows prompt-major: one host copy of the
    block, no per-candidate tensor indexing."""
    ids, keep = toks.tolist(), tmask.tolist()
    return [responses[r // k] + [t for t, m in zip(ids[r], keep[r]) if m] for r in range(len(ids))]


class _Scorer:
    def __init__(self):
        self.cost = {"value_tokens": 0}

    def open(self, prompts: list[str], prompt_ids: list[list[int]]) -> None:
        self.prompts, self.prompt_ids = list(prompts), [list(p) for p in prompt_ids]
        self.cost = {"value_tokens": 0}

    def keep(self, winners: torch.Tensor, survivors: list[int]) -> None:
        self.prompts = [self.prompts[j] for j in survivors]
        self.prompt_ids = [self.prompt_ids[j] for j in survivors]


class NoScorer(_Scorer):
    """K = 1 and nothing to score: values with no objectives."""

    def score(self, responses, toks, tmask, k):
        return torch.zeros(len(responses), k, 0, device=toks.device)


class RewardScorer(_Scorer):
    def __init__(self, tokenizer, rewards, stop: set[int]):
        super().__init__()
        self.tok, self.rewards, self.stop = tokenizer, rewards, stop

    def score(self, responses, toks, tmask, k):
        rows = candidate_rows(responses, toks, tmask, k)
        texts = [t.strip() for t in self.tok.batch_decode([[t for t in s if t not in self.stop] for s in rows],
                                                          skip_special_tokens=True)]
        prompts = [p for p in self.prompts for _ in range(k)]
        return self.rewards.score(prompts, texts, normalize=True).to(toks.device).view(len(responses), k, -1).float()


class _ValueScorer(_Scorer):
    def __init__(self, value, vtok, tokenizer, stop: set[int], pad: int):
        super().__init__()
        self.value, self.vtok, self.tok, self.stop = value, vtok, tokenizer, stop
        self.vpad = vtok.pad_token_id if vtok is not None and vtok.pad_token_id is not None else pad
        self.device = value.head.weight.device

    def _value_ids(self, prompt_vids: list[list[int]], rows: list[list[int]]) -> list[list[int]]:
        """What the value model reads for each (prompt, response so far), as in training (`value_prompt_ids` +
        `value_response_ids`), cut from the left to its position limit (an over-long input is a device-side assert
        otherwise)."""
        if self.value.meta.shares_policy_tokenizer:
            resp = value_response_ids(self.value.meta, self.vtok, response_ids=rows,
                                      finished=[bool(s) and s[-1] in self.stop for s in rows])
        else:
            texts = self.tok.batch_decode([[t for t in s if t not in self.stop] for s in rows],
                                          skip_special_tokens=True)
            resp = value_response_ids(self.value.meta, self.vtok, response_texts=texts,
                                      finished=[bool(s) and s[-1] in self.stop for s in rows])
        limit = self.value.max_positions
        return [(p + r)[-limit:] if limit else p + r for p, r in zip(prompt_vids, resp)]


class ReencodingScorer(_ValueScorer):
    def open(self, prompts, prompt_ids):
        super().open(prompts, prompt_ids)
        self.vprompt = (self.prompt_ids if self.value.meta.shares_policy_tokenizer
                        else value_prompt_ids(self.value.meta, self.vtok, self.prompts))

    def keep(self, winners, survivors):
        super().keep(winners, survivors)
        self.vprompt = [self.vprompt[j] for j in survivors]

    def score(self, responses, toks, tmask, k):
        rows = candidate_rows(responses, toks, tmask, k)
        if self.value.meta.shares_policy_tokenizer:  # the policy's own ids, prompt as the policy read it
            full = [self.prompt_ids[r // k] + s for r, s in enumerate(rows)]
        else:
            full = self._value_ids([self.vprompt[r // k] for r in range(len(rows))], rows)
        ids, mask = left_pad(full, self.vpad, self.device)
        self.cost["value_tokens"] += int(mask.sum())
        values, _ = self.value(ids, mask)
        return values[:, -1].view(len(responses), k, -1)


class SharedCacheScorer(_ValueScorer):
    """The value model reads the policy's ids: prefill each prompt once, extend by each block's B tokens."""

    def open(self, prompts, prompt_ids):
        super().open(prompts, prompt_ids)
        ids, pmask = left_pad(self.prompt_ids, self.vpad, self.device)
        _, self.state = self.value.prefill(ids, pmask)
        self.cost["value_tokens"] += int(pmask.sum())

    def score(self, responses, toks, tmask, k):
        n, b = len(responses), toks.shape[1]
        self.cost["value_tokens"] += n * k * b
        values, self.state = self.value.score_blocks(self.state, toks.view(n, k, b), tmask.view(n, k, b))
        return values

    def keep(self, winners, survivors):
        super().keep(winners, survivors)
        if survivors:
            self.state = self.state.select(winners[torch.tensor(survivors, dtype=torch.long, device=winners.device)])


class RetokenizingScorer(_ValueScorer):
    """The value model has its own tokenizer. Re-tokenising a longer text can change the last few ids of the text
    already scored (a BPE merge across the block boundary), so each candidate keeps the longest common prefix of its
    ids with the kept branch's ids, always re-encoding at least its last id, and encodes the rest. Cache entries
    past the common prefix stay in the cache but are masked off; positions come from the mask, so every token sees
    exactly the prefix a full re-encoding would give it. When the cache's length would pass the value model's
    position limit or attention window (where masked entries would count), the block is re-encoded from scratch."""

    def open(self, prompts, prompt_ids):
        super().open(prompts, prompt_ids)
        self.vprompt = value_prompt_ids(self.value.meta, self.vtok, self.prompts)
        limit = self.value.max_positions
        self.committed = [p[-limit:] if limit else list(p) for p in self.vprompt]  # the ids each row's cache holds
        ids, pmask = left_pad(self.committed, self.vpad, self.device)
        _, self.state = self.value.prefill(ids, pmask)
        self.cost["value_tokens"] += int(pmask.sum())
        config = self.value.backbone.config
        limits = [getattr(config, "sliding_window", None), self.value.max_positions]
        self.capacity = min([x for x in limits if x] or [float("inf")])

    def score(self, responses, toks, tmask, k):
        n, dev = len(responses), self.device
        rows = candidate_rows(responses, toks, tmask, k)
        want = self._value_ids([self.vprompt[r // k] for r in range(len(rows))], rows)
        base = [self.committed[r // k] for r in range(len(rows))]
        kept = common_prefix(base, want)
        kept = [min(c, len(w) - 1) for c, w in zip(kept, want)]  # re-encode at least the last id
        new = [w[c:] for c, w in zip(kept, want)]
        width = max(len(x) for x in new)
        state = self.state.repeat(k)
        shifted = any(c < len(self.vprompt[r // k]) - 1 for r, c in enumerate(kept))  # cut from the left
        if shifted or state.attention_mask.shape[1] + width > self.capacity:
            ids, mask = left_pad(want, self.vpad, dev)  # from scratch
            values, state = self.value.prefill(ids, mask)
            self.cost["value_tokens"] += int(mask.sum())
            self.state, self.pending = state, want
            return values[:, -1].view(n, k, -1)
        real = state.attention_mask.long()
        kept_t = torch.tensor(kept, device=real.device)
        state = ValueState(state.cache, real * (real.cumsum(1) <= kept_t[:, None]))
        ids = torch.full((len(new), width), self.vpad, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for r, x in enumerate(new):  # right-padded: the pads become masked entries like the rolled-back ones
            ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[r, : len(x)] = 1
        values, self.state = self.value.extend(state, ids.to(dev), mask.to(dev))
        self.cost["value_tokens"] += int(mask.sum())
        self.pending = want
        return block_end_values(values, mask, None).view(n, k, -1)

    def keep(self, winners, survivors):
        super().keep(winners, survivors)
        w = winners.tolist()
        self.vprompt = [self.vprompt[j] for j in survivors]
        self.committed = [self.pending[w[j]] for j in survivors]
        if survivors:
            self.state = self.state.select(winners[torch.tensor(survivors, dtype=torch.long, device=winners.device)])


def common_prefix(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Length of the longest common prefix of a[r] and b[r], for every row at once."""
    width = max(max(len(x) for x in a), max(len(x) for x in b))
    pa = torch.full((len(a), width), -1, dtype=torch.long)
    pb = torch.full((len(b), width), -2, dtype=torch.long)
    for r, (x, y) in enumerate(zip(a, b)):
        pa[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        pb[r, : len(y)] = torch.tensor(y, dtype=torch.long)
    return (pa == pb).long().cumprod(1).sum(1).tolist()
