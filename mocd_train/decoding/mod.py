"""MOD (docs/algorithms.md §4): combine M policies trained with one f-divergence regulariser into the next-token
distribution of their w-weighted optimum, token by token, without training.

The per-token rules are pure functions of log-probabilities (`combine`). The policies run as one batched forward per
step: LoRA adapters on a shared base go through PEFT's mixed-adapter batches (row m·N + i uses adapter m), full models
run one after another; π_ref is only run for the JSD rule. The reference code fed raw logits to its greedy path,
replaced JSD by reverse KL silently and hard-coded two objectives; here log_softmax is always taken first, the JSD
approximation is an explicit option and M is any number ≥ 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mocd_train.data import chat_texts, eos_ids, pad_id
from mocd_train.decoding.backends import sample_tokens
from mocd_train.decoding.engine import Decoded, in_batches
from mocd_train.errors import ConfigError, NonFiniteError
from mocd_train.models import adapter_base, adapter_of, load_policy
from mocd_train.tensors import left_pad, positions

RULES = ("reverse_kl", "forward_kl", "js", "alpha")
LOG2 = math.log(2.0)


def check_weights(weights, num_policies: int, rule: str) -> torch.Tensor:
    """Weights are finite and sum to 1; negative entries only where the rule's algebra allows them (reverse KL, JSD)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim != 1 or len(w) != num_policies:
        raise ConfigError(f"MOD weights: one per policy ({num_policies}), got {list(map(float, w.view(-1)))}.")
    if not bool(torch.isfinite(w).all()):
        raise ConfigError(f"MOD weights must be finite numbers, got {w.tolist()}.")
    if abs(float(w.sum()) - 1.0) > 1e-6:
        raise ConfigError(f"MOD weights must sum to 1 (they weight the policies' f-divergence optimality "
                          f"conditions), got sum {float(w.sum()):.6g}.")
    if (w < 0).any() and rule in ("forward_kl", "alpha"):
        raise ConfigError(f"MOD weights: negative weights are defined for reverse_kl (and js) only; the {rule} rule "
                          "takes log w_i. Use non-negative weights or reverse-KL-trained policies.")
    return w


def combine(logps: torch.Tensor, weights, rule: str = "reverse_kl", alpha: float = 0.5,
            ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """logps [M, ..., V] (log-probabilities of the M policies) → the combined unnormalised log-score [..., V]
    (MOD, Shi et al., NeurIPS 2024, §3 and App. D; docs/algorithms.md §4).

    reverse KL  Σ w_i log π_i
    forward KL  −logsumexp_i(log w_i − log π_i)
    α           −(1/α) logsumexp_i(log w_i − α log π_i), α ∈ (0, 1]
    JSD         `jsd_score`: log π_ref + v − log(2 − e^v), v = Σ w_i log(2u_i/(1 + u_i)), u_i = π_i/π_ref
    """
    w = check_weights(weights, logps.shape[0], rule).to(logps.device, logps.dtype)
    if torch.isnan(logps).any():
        bad = int(torch.isnan(logps.reshape(logps.shape[0], -1)).any(-1).nonzero()[0])
        raise NonFiniteError(f"MOD: policy {bad}'s log-probabilities contain NaN (a diverged or overflowing model).")
    shape = (-1,) + (1,) * (logps.ndim - 1)
    if rule == "reverse_kl":
        return (w.view(shape) * logps).sum(0)
    if rule in ("forward_kl", "alpha"):
        a = 1.0 if rule == "forward_kl" else alpha
        if not (math.isfinite(a) and 0 < a <= 1):
            raise ConfigError(f"alpha: {a} must lie in (0, 1].")
        keep = w > 0  # log 0 = −inf: a zero weight drops its policy
        terms = torch.log(w[keep]).view(shape) - a * logps[keep]
        return -torch.logsumexp(terms, 0) / a
    if rule == "js":
        if ref_logp is None:
            raise ValueError("the JSD rule needs π_ref's log-probabilities.")
        return jsd_score(logps, w, ref_logp)
    raise ConfigError(f"MOD rule {rule!r} is not one of {', '.join(RULES)}.")


def jsd_score(logps: torch.Tensor, w: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The JSD rule without cancellation, for any u_i = π_i/π_ref and any weights summing to 1.

    ∇f(u) = log(2u/(1 + u)) = log 2 − softplus(−log u), so with Σ w_i = 1, v = log 2 − a where
    a = Σ_i w_i softplus(−log u_i), and the closed form π_ref e^v/(2 − e^v) becomes
        score = log π_ref − a − log(1 − e^{−a}),
    evaluated with expm1: nothing cancels, even where u is 1e12 and a is 1e-12 (forming v first loses every digit
    there, and the old clamp then made such tokens nearly certain). For w = e_i it is log π_i exactly.

    (∇f)⁻¹ exists only below log 2, i.e. for a > 0, which non-negative weights always give. A negative weight can
    push a token to a ≤ 0: the weighted optimality condition then asks for an unbounded ratio π/π_ref, and the
    closed form has no value. Such rows use the exact token-level optimum of the same f-regularised problem,
    π_ref (∇f)⁻¹(y − λ), whose normaliser λ sits inside (∇f)⁻¹: it replaces a by a + λ with the λ > −min a that makes
    the row sum to one, found by bisection (for reverse KL the two normalisations coincide)."""
    x = ref_logp.unsqueeze(0) - logps  # −log u
    softplus = x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))  # torch's softplus drops e^{−x} beyond x = 20
    a = (w.view((-1,) + (1,) * (logps.ndim - 1)) * softplus).sum(0)
    bad = (a <= 0).any(-1)
    if bool(bad.any()):
        a = a.clone()
        a[bad] = a[bad] + _jsd_shift(a[bad], ref_logp[bad])[..., None]
    return ref_logp - a - torch.log(-torch.expm1(-a))


def _jsd_shift(a: torch.Tensor, ref_logp: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """λ [R] with logsumexp_s(log π_ref − (a + λ) − log(1 − e^{−(a+λ)})) = 0, by bisection on λ = −min a + e^θ
    (the mass falls monotonically from +∞ as λ ↓ −min a to 0 as λ → ∞)."""
    base = -a.amin(-1)

    def mass(theta):
        b = a + (base + theta.exp())[..., None]
        return torch.logsumexp(ref_logp - b - torch.log(-torch.expm1(-b)), -1)

    lo = torch.full_like(base, -80.0)
    hi = torch.full_like(base, 10.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        over = mass(mid) > 0
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    return base + (0.5 * (lo + hi)).exp()


def next_tokens(score: torch.Tensor, greedy: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """argmax of the combined score, or a sample from softmax(score / T) within top-k / top-p."""
    if greedy:
        return score.argmax(-1)
    if top_k:
        kth = score.topk(min(top_k, score.shape[-1]), -1).values[..., -1:]
        score = score.masked_fill(score < kth, -float("inf"))
    return sample_tokens(score, temperature, top_p, generator)


# ------------------------------------------------------------------------------------------------------ policies


class PolicySet:
    """M policies on one vocabulary, evaluated together: `forward` returns log-probs [M(+1), N, V] for N rows
    (the last block is π_ref when `with_ref`) and the caches to continue from.

    Built from LoRA adapters on one base (`from_adapters`: one PEFT mixed-adapter batch of (M + ref)·N rows, one
    KV cache) or from full models (`from_models`: one forward and one cache per model)."""

    def __init__(self, models: list, adapter_names: list[str] | None, ref_model=None):
        self.models, self.adapters, self.ref_model = models, adapter_names, ref_model
        self.num_policies = len(adapter_names) if adapter_names is not None else len(models)

    @classmethod
    def from_adapters(cls, base, adapters: dict[str, str | Path]) -> "PolicySet":
        from peft import PeftModel

        names = list(adapters)
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(adapters[n]), adapter_name=n)
        return cls([model.eval()], names)

    @classmethod
    def for_policies(cls, paths: list[Path], ref, rule: str, cache_dir: str | None = None) -> "PolicySet":
        """The one way a run's trained policies become a MOD policy set: LoRA adapters on π_ref (`ref`, loaded) as one
        batched model — refused if their base is not π_ref, since MOD combines policies regularised towards one
        reference — else full checkpoints, with π_ref beside them for the JSD rule."""
        adapters = [adapter_of(p) for p in paths]
        if all(adapters):
            bases = {Path(adapter_base(a)).resolve() for a in adapters}
            if bases != {Path(ref.config._name_or_path).resolve()}:
                raise ConfigError(f"mod: the adapters' base models {sorted(map(str, bases))} are not this run's model "
                                  f"{ref.config._name_or_path}; MOD combines policies regularised towards one π_ref.")
            return cls.from_adapters(ref, {f"p{i}": a for i, a in enumerate(adapters)})
        models = [load_policy(p, ref.device, ref.dtype, cache_dir)[0] for p in paths]
        return cls.from_models(models, ref_model=ref if rule == "js" else None)

    @classmethod
    def from_models(cls, models: list, ref_model=None) -> "PolicySet":
        vocab = {m.get_output_embeddings().weight.shape[0] for m in models + ([ref_model] if ref_model else [])}
        if len(vocab) != 1:
            raise ConfigError(f"MOD policies must share one vocabulary; their output sizes are {sorted(vocab)}.")
        return cls([m.eval() for m in models], None, ref_model)

    @property
    def device(self):
        return self.models[0].device

    @property
    def config(self):
        return self.models[0].config

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, caches, with_ref: bool):
        """ids/mask [N, L] are shared by all policies (they decode the same prefix); caches None on the prefill."""
        from transformers import DynamicCache

        pos = positions(mask, ids.shape[1])
        if self.adapters is not None:
            names = self.adapters + (["__base__"] if with_ref else [])
            r = len(names)
            model = self.models[0]
            caches = caches if caches is not None else DynamicCache(config=model.config)
            out = model(input_ids=ids.repeat(r, 1), attention_mask=mask.repeat(r, 1), position_ids=pos.repeat(r, 1),
                        past_key_values=caches,
                        use_cache=True, adapter_names=[n for n in names for _ in range(mask.shape[0])])
            logp = torch.log_softmax(out.logits[:, -1].float(), -1).view(r, mask.shape[0], -1)
            return logp, out.past_key_values
        models = self.models + ([self.ref_model] if with_ref else [])
        caches = caches or [DynamicCache(config=m.config) for m in models]
        logps = []
        for m, c in zip(models, caches):
            out = m(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=c, use_cache=True)
            logps.append(torch.log_softmax(out.logits[:, -1].float(), -1))
        return torch.stack(logps), caches

    def sequence_logprobs(self, ids: torch.Tensor, mask: torch.Tensor, with_ref: bool) -> torch.Tensor:
        """Teacher-forced log-probs [M(+1), N, L, V] at every position (for token-level distillation)."""
        pos = positions(mask)
        if self.adapters is not None:
            names = self.adapters + (["__base__"] if with_ref else [])
            r = len(names)
            out = self.models[0](input_ids=ids.repeat(r, 1), attention_mask=mask.repeat(r, 1),
                                 position_ids=pos.repeat(r, 1),
                                 adapter_names=[n for n in names for _ in range(ids.shape[0])])
            return torch.log_softmax(out.logits.float(), -1).view(r, *ids.shape, -1)
        models = self.models + ([self.ref_model] if with_ref else [])
        return torch.stack([torch.log_softmax(m(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float(),
                                              -1) for m in models])


@dataclass
class Mod:
    """The MOD decoder on the `Decoder` interface: token-by-token sampling from the combined distribution."""

    policies: PolicySet
    tokenizer: object
    weights: list[float]
    rule: str = "reverse_kl"
    alpha: float = 0.5
    jsd_approximation: bool = False  # the reference code's silent substitute: JSD decoded with the reverse-KL rule
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    system_prompt: str | None = None
    batch_size: int = 8
    ignore_eos: bool = False  # benchmarks: every response runs the full max_new_tokens
    name: str = "mod"
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        check_weights(self.weights, self.policies.num_policies, self.rule)
        if self.rule == "js" and not self.jsd_approximation and self.policies.adapters is None \
                and self.policies.ref_model is None:
            raise ConfigError("the JSD rule needs π_ref: pass ref_model (or LoRA adapters, whose base is π_ref), or "
                              "set jsd_approximation to decode with the reverse-KL rule.")
        self.effective_rule = "reverse_kl" if self.rule == "js" and self.jsd_approximation else self.rule
        self.with_ref = self.effective_rule == "js"
        stop = eos_ids(self.policies.models[0], self.tokenizer)
        self.pad = pad_id(self.tokenizer, stop)
        self.stop = torch.tensor([] if self.ignore_eos else stop, dtype=torch.long)

    def combined(self, logps: torch.Tensor) -> torch.Tensor:
        m = self.policies.num_policies
        return combine(logps[:m], self.weights, self.effective_rule, self.alpha, logps[m] if self.with_ref else None)

    def logprobs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The combined next-token log-distribution [N, L, V] at every position of given sequences: the
        token-level distillation target."""
        return torch.log_softmax(self.combined(self.policies.sequence_logprobs(ids, mask, self.with_ref)), -1)

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator | None = None, progress=None) -> list[Decoded]:
        return in_batches(prompts, self.batch_size, lambda batch: self._batch(batch, generator), progress)

    def _batch(self, prompts, generator):
        t0 = time.perf_counter()
        dev = self.policies.device
        stop = self.stop.to(dev)
        prompt_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"]
                      for t in chat_texts(self.tokenizer, prompts, self.system_prompt)]
        ids, mask = left_pad(prompt_ids, self.pad, dev)
        n = len(prompts)
        logps, cache = self.policies.forward(ids, mask, None, self.with_ref)
        rows = logps.shape[0]
        tokens = torch.full((n, self.max_new_tokens), self.pad, dtype=torch.long, device=dev)
        alive = torch.ones(n, dtype=torch.bool, device=dev)
        steps = 0
        for s in range(self.max_new_tokens):
            nxt = next_tokens(self.combined(logps), self.greedy, self.temperature, self.top_k, self.top_p, generator)
            nxt = torch.where(alive, nxt, torch.full_like(nxt, self.pad))
            tokens[:, s] = nxt
            steps = s + 1
            mask = torch.cat([mask, alive.long()[:, None]], 1)
            alive = alive & ~torch.isin(nxt, stop)
            if not alive.any() or s == self.max_new_tokens - 1:
                break
            logps, cache = self.policies.forward(nxt[:, None], mask, cache, self.with_ref)
        seconds = time.perf_counter() - t0
        response_mask = mask[:, mask.shape[1] - steps:].bool()
        out, stop_set = [], set(stop.tolist())
        for i in range(n):
            kept = tokens[i, :steps][response_mask[i]].tolist()
            text_ids = [t for t in kept if t not in stop_set]
            out.append(Decoded(prompts[i], self.tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
                               text_ids, not bool(alive[i]), None, [],
                               {"policy_tokens": len(kept) * rows, "value_tokens": 0,
                                "prefill_tokens": len(prompt_ids[i]) * rows, "seconds": seconds / n,
                                "batch_prompts": n}))
        return out
