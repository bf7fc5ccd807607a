"""Sampling backends: π_ref's side of the block decoders (docs/architecture.md, "The fast path").

A backend holds branches of prompts and samples B more tokens for every branch at a time; the engine scores the
candidates and tells it which branch of each prompt to keep. Selection rules and value scoring never see the
backend, so RMOD, the CD baselines, Best-of-K and π_ref run on any of them:
    open(prompt ids, K) · sample(B) → tokens, mask, alive · keep(winners, survivors) · cost
`HFBackend` is the cached Hugging Face engine; `VLLMBackend` serves π_ref with vLLM (blocks are re-submitted as
prompt + kept tokens with n = K and automatic prefix caching, so the shared prefix is not recomputed). MOD, which
needs every policy's full next-token distribution, runs on Hugging Face models only (decoding/mod.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

import torch

from mocd_train.assets import resolve_model
from mocd_train.data import eos_ids, pad_id
from mocd_train.errors import ConfigError
from mocd_train.models import is_policy_dir, load_causal_lm, load_tokenizer, resolve_dtype
from mocd_train.tensors import left_pad, positions

# vLLM's CPU defaults, measured on a 2-core, 24 GiB machine, take ~85 % of the RAM for the KV cache (the scorers and
# value model then run out of memory), bind its worker to one core of two and cut torch to one thread; the engine
# is run in this process instead, with every core and a 4 GiB cache (~90k tokens of SmolLM2 in fp32). Each is an
# environment variable the user can set first.
_CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                    "OMP_NUM_THREADS": lambda: str(torch.get_num_threads())}
_SYNC_EVERY = 4  # sampling steps between checks that some branch is still alive (each check syncs with the device)


class SamplingBackend(Protocol):
    cost: dict
    device: torch.device  # where sample() puts its tensors
    stop_ids: list[int]  # tokens that end a branch
    pad: int  # the id in the tokens after a branch ended (mask 0)

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
    if temperature == 0:  # greedy (the backends' cross-check)
        return logits.argmax(-1)
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
        self.policy, self.pad, self.stop, self.device = policy, pad, stop, policy.device
        self.stop_ids = stop.tolist()
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


class VLLMBackend:
    """π_ref served by vLLM. A block is one request per open prompt — its prompt ids + the kept tokens, n = K,
    max_tokens = B — and vLLM's automatic prefix caching finds the shared prefix (the prompt and every kept block)
    already computed; a whole response (rollouts, Best-of-K, π_ref) is one block of T tokens.

    Randomness: on CUDA every request gets a seed drawn from the caller's generator (or the global torch RNG), so a
    chunk's samples depend only on its seed, as on the Hugging Face backend — though not the same samples, since
    the two draw differently. vLLM on CPU refuses per-request seeds; there the engine is seeded once
    (`LLM(seed=...)`), a run from scratch repeats itself, and a resumed run continues with other (equally
    distributed) samples than an uninterrupted one would have drawn."""

    def __init__(self, llm, stop: list[int], pad: int, temperature: float = 1.0, top_p: float = 1.0,
                 device: torch.device | str = "cpu", per_request_seeds: bool | None = None,
                 dtype: torch.dtype = torch.float32, sampling_options: dict | None = None):
        self.llm, self.stop_ids, self.pad, self.dtype = llm, list(stop), pad, dtype
        self.sampling_options = sampling_options or {}  # more vllm.SamplingParams fields (allowed_token_ids, ...)
        self.temperature, self.top_p, self.device = temperature, top_p, torch.device(device)
        self.per_request_seeds = self.device.type == "cuda" if per_request_seeds is None else per_request_seeds
        self.cost = {"policy_tokens": 0, "prefill_tokens": 0, "cached_tokens": 0}

    @classmethod
    def load(cls, checkpoint: str, tokenizer, *, device: torch.device, dtype: torch.dtype, seed: int = 0,
             temperature: float = 1.0, top_p: float = 1.0, options: dict | None = None) -> "VLLMBackend":
        """An engine for a checkpoint folder or hub id; `options` go to vllm.LLM (gpu_memory_utilization,
        tensor_parallel_size, max_model_len, ...)."""
        if device.type == "cpu":
            for name, value in _CPU_ENVIRONMENT.items():  # read when the engine starts; a value the user set wins
                os.environ.setdefault(name, value() if callable(value) else value)
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(f"backend: vllm needs vLLM installed ({e}); see docs/architecture.md, \"Sampling "
                              "backends\", or use backend: hf.") from None
        from transformers import GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(checkpoint)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation = GenerationConfig()
        stop = eos_ids(SimpleNamespace(generation_config=generation), tokenizer)
        options = dict(options or {})
        if device.type == "cuda":
            options.setdefault("gpu_memory_utilization", 0.5)
        else:  # the prefix cache shares whole KV blocks; vLLM's CPU default (128 tokens) outgrows most prompts
            options.setdefault("block_size", 32)
            options.setdefault("enforce_eager", True)  # compiling costs minutes at start for little gain on a CPU
        llm = LLM(model=checkpoint, dtype=str(dtype).removeprefix("torch."), seed=seed, enable_prefix_caching=True,
                  **options)
        pad = pad_id(tokenizer, stop)
        return cls(llm, stop, pad, temperature, top_p, device, dtype=dtype)

    def open(self, prompt_ids, k):
        self.prompts, self.k = [list(p) for p in prompt_ids], k
        self.kept = [[] for _ in prompt_ids]
        self.cost = {"policy_tokens": 0, "prefill_tokens": 0, "cached_tokens": 0}  # cached: from the prefix cache

    def sample(self, b, last, generator):
        from vllm import SamplingParams, TokensPrompt  # heavy

        n = len(self.prompts)
        seeds = (torch.randint(2**31 - 1, (n,), generator=generator, device=generator.device if generator
                               is not None else "cpu").tolist() if self.per_request_seeds else [None] * n)
        params = [SamplingParams(n=self.k, max_tokens=b, temperature=self.temperature, top_p=self.top_p,
                                 stop_token_ids=self.stop_ids, ignore_eos=not self.stop_ids, detokenize=False,
                                 seed=seed, **self.sampling_options) for seed in seeds]
        requests = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(self.prompts, self.kept)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows, ended = [], []
        for request, out in zip(requests, outputs):
            cached = out.num_cached_tokens or 0
            self.cost["prefill_tokens"] += len(request["prompt_token_ids"]) - cached
            self.cost["cached_tokens"] += cached
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids, stopped = list(c.token_ids), c.finish_reason == "stop"
                if stopped and (not ids or ids[-1] not in self.stop_ids):
                    ids.append(self.stop_ids[0])  # the stop token closes the branch, as on the HF backend
                rows.append(ids)
                ended.append(stopped)
        width = max(len(r) for r in rows)
        toks = torch.full((len(rows), width), self.pad, dtype=torch.long)
        tmask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            toks[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            tmask[i, : len(r)] = 1
        self.cost["policy_tokens"] += len(rows) * width
        self._rows = rows
        return toks.to(self.device), tmask.to(self.device), ~torch.tensor(ended, device=self.device)

    def keep(self, winners, survivors):
        for j, w in enumerate(winners.tolist()):
            self.kept[j] += self._rows[w]
        self.prompts = [self.prompts[j] for j in survivors]
        self.kept = [self.kept[j] for j in survivors]


def load_sampler(cfg, device: torch.device, num_processes: int = 1):
    """(π_ref, tokenizer) for a stage that samples from it (`SamplingConfig.backend`): the Hugging Face model, or a
    `VLLMBackend` on the same checkpoint (a trained policy folder must hold a full checkpoint: merged/ or model/)."""
    if cfg.backend == "hf":
        return load_causal_lm(cfg.model, device, cfg.dtype, cfg.cache_dir)
    if num_processes > 1:
        raise ConfigError(f"backend: vllm runs in one process ({num_processes} were launched); it spreads one model "
                          "over GPUs itself (vllm_args: {tensor_parallel_size: N}). Launch without accelerate.")
    checkpoint = resolve_model(cfg.model, cfg.cache_dir)
    if is_policy_dir(cfg.model):
        full = next((Path(cfg.model) / sub for sub in ("merged", "model") if (Path(cfg.model) / sub).is_dir()), None)
        if full is None:
            raise ConfigError(f"model: vLLM loads full checkpoints and {cfg.model} holds a LoRA adapter only; train "
                              "it with merge: true (policies/<name>/merged), or use backend: hf.")
        checkpoint = str(full)
    tokenizer = load_tokenizer(checkpoint)
    backend = VLLMBackend.load(checkpoint, tokenizer, device=device, dtype=resolve_dtype(cfg.dtype, device),
                               seed=cfg.seed, temperature=cfg.temperature, top_p=cfg.top_p, options=cfg.vllm_args)
    return backend, tokenizer
