import math

import mpmath
import numpy as np
import pytest
import torch

from mocd_train.config import ConfigError
from mocd_train.decoding.mod import Mod, PolicySet, combine, next_tokens


def random_logps(m=3, n=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(m, n, v, generator=g, dtype=torch.float64) * 2, -1)


def direct(logps, w, rule, alpha=0.5, ref=None):
    """π ∝ π_ref · (∇f)⁻¹(Σ_i w_i ∇f(π_i / π_ref)) in probability space (docs/algorithms.md §4), normalised."""
    p, w = logps.exp().numpy(), np.asarray(w, dtype=np.float64)[:, None, None]
    ref = np.full(p.shape[1:], 1.0 / p.shape[-1]) if ref is None else ref.exp().numpy()
    u = p / ref
    if rule == "reverse_kl":  # ∇f = log u + 1
        out = ref * np.exp((w * np.log(u)).sum(0))
    elif rule == "forward_kl":  # ∇f = −1/u
        out = ref / (w / u).sum(0)
    elif rule == "alpha":  # ∇f = (1 − u^−α)/α
        out = ref * ((w * u ** -alpha).sum(0)) ** (-1 / alpha)
    else:  # js: ∇f = log(2u/(1+u)), inverse y ↦ e^y / (2 − e^y)
        y = (w * np.log(2 * u / (1 + u))).sum(0)
        out = ref * np.exp(y) / (2 - np.exp(y))
    return torch.from_numpy(out / out.sum(-1, keepdims=True))


@pytest.mark.parametrize("rule", ["reverse_kl", "forward_kl", "alpha", "js"])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_each_rule_equals_its_direct_formula(rule, m):
    logps = random_logps(m)
    ref = random_logps(1, seed=9)[0]
    w = torch.softmax(torch.randn(m, generator=torch.Generator().manual_seed(m), dtype=torch.float64), 0)
    score = combine(logps, w, rule, alpha=0.3, ref_logp=ref)
    torch.testing.assert_close(torch.softmax(score, -1), direct(logps, w, rule, 0.3, ref), atol=1e-10, rtol=0)


def test_limits_and_unit_weights():
    logps, ref = random_logps(3), random_logps(1, seed=4)[0]
    w = [0.2, 0.5, 0.3]
    soft = lambda s: torch.softmax(s, -1)  # noqa: E731
    torch.testing.assert_close(soft(combine(logps, w, "alpha", alpha=1.0)), soft(combine(logps, w, "forward_kl")))
    near = soft(combine(logps, w, "alpha", alpha=1e-4))
    assert (near - soft(combine(logps, w, "reverse_kl"))).abs().max() < 1e-3  # α → 0: reverse KL
    for rule in ("reverse_kl", "forward_kl", "alpha", "js"):
        for i in range(3):
            e = [1.0 if j == i else 0.0 for j in range(3)]
            torch.testing.assert_close(soft(combine(logps, e, rule, ref_logp=ref)), logps[i].exp(), atol=1e-6, rtol=0)


def extreme_logps(m, dtype, seed=0, v=12):
    """π_ref and M policies whose ratios u = π_i/π_ref span 1e-12 … 1e12 over the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64), -1)
    log_u = (torch.rand(m, v, generator=g, dtype=torch.float64) * 2 - 1) * math.log(1e12)
    logps = torch.log_softmax(ref + log_u, -1)
    return logps.to(dtype), ref.to(dtype)


def mp_jsd(logps, ref, w):
    """The closed form π ∝ π_ref e^y / (2 − e^y), y = Σ w_i log(2u_i/(1 + u_i)), in 60-digit arithmetic."""
    mpmath.mp.dps = 60
    out = []
    for s in range(ref.shape[-1]):
        r = mpmath.mpf(float(ref[s]))
        y = mpmath.fsum(mpmath.mpf(float(wi)) * mpmath.log(2 * u / (1 + u))
                        for wi, u in zip(w, [mpmath.exp(mpmath.mpf(float(lp[s])) - r) for lp in logps]))
        out.append(mpmath.exp(r) * mpmath.exp(y) / (2 - mpmath.exp(y)))
    total = mpmath.fsum(out)
    return torch.tensor([float(x / total) for x in out], dtype=torch.float64)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_jsd_is_accurate_for_any_ratio(dtype, tol, m):
    """Against 60-digit arithmetic on the same inputs, with π_i/π_ref from 1e-12 to 1e12 (forming v first lost
    all precision there: total variation up to 0.7)."""
    for seed in range(3):
        logps, ref = extreme_logps(m, dtype, seed)
        w = torch.softmax(torch.randn(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 0)
        got = torch.softmax(combine(logps, w.to(dtype), "js", ref_logp=ref).double(), -1)
        assert 0.5 * (got - mp_jsd(logps, ref, w)).abs().sum() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_weights_return_that_policy_for_every_rule_and_ratio(dtype):
    logps, ref = extreme_logps(3, dtype, seed=5)
    for rule in ("reverse_kl", "forward_kl", "alpha", "js"):
        for i in range(3):
            e = [1.0 if j == i else 0.0 for j in range(3)]
            got = torch.softmax(combine(logps, e, rule, ref_logp=ref).double(), -1)
            assert (got - logps[i].double().exp()).abs().max() <= (1e-12 if dtype == torch.float64 else 1e-6)


def test_jsd_with_negative_weights_beyond_its_range_uses_the_exact_token_optimum():
    """Where Σ w_i ∇f(u_i) ≥ log 2 no closed form exists; the row is π_ref (∇f)⁻¹(y − λ) with λ making it sum to
    one (checked in 60 digits)."""
    logps, ref = extreme_logps(2, torch.float64, seed=7)
    w = [1.8, -0.8]
    a = 1.8 * torch.nn.functional.softplus(ref - logps[0]) - 0.8 * torch.nn.functional.softplus(ref - logps[1])
    assert (a <= 0).any()  # the case in question
    got = torch.softmax(combine(logps, w, "js", ref_logp=ref), -1)
    assert abs(float(combine(logps, w, "js", ref_logp=ref).logsumexp(-1))) < 1e-9  # normalised by λ itself
    mpmath.mp.dps = 60
    am = [mpmath.mpf(float(x)) for x in a]

    def mass(lam):
        return mpmath.fsum(mpmath.exp(mpmath.mpf(float(r)) - (x + lam)) / (1 - mpmath.exp(-(x + lam)))
                           for r, x in zip(ref, am))

    lam = mpmath.findroot(lambda t: mass(t) - 1, (-min(am) + mpmath.mpf("1e-30"), mpmath.mpf(50)),
                          solver="bisect", tol=mpmath.mpf("1e-40"))
    expected = torch.tensor([float(mpmath.exp(mpmath.mpf(float(r)) - (x + lam)) / (1 - mpmath.exp(-(x + lam))))
                             for r, x in zip(ref, am)], dtype=torch.float64)
    assert (got - expected).abs().max() < 1e-12


def test_non_finite_weights_and_log_probabilities_are_refused():
    logps = random_logps(2)
    with pytest.raises(ConfigError, match="finite"):
        combine(logps, [float("nan"), 0.5], "reverse_kl")
    bad = logps.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="policy 1"):
        combine(bad, [0.5, 0.5], "forward_kl")


def test_negative_weights_and_bad_weights():
    logps = random_logps(2)
    score = combine(logps, [1.5, -0.5], "reverse_kl")
    torch.testing.assert_close(score, 1.5 * logps[0] - 0.5 * logps[1])
    assert torch.isfinite(combine(logps, [1.5, -0.5], "js", ref_logp=random_logps(1)[0])).all()  # clamped
    with pytest.raises(ConfigError, match="negative weights"):
        combine(logps, [1.5, -0.5], "forward_kl")
    with pytest.raises(ConfigError, match="one per policy"):
        combine(logps, [0.2, 0.3, 0.5], "reverse_kl")
    with pytest.raises(ConfigError, match="sum to 1"):
        combine(logps, [0.2, 0.3], "reverse_kl")


def test_greedy_uses_log_probabilities_and_top_k_restricts_sampling():
    logps = random_logps(2, n=64)
    score = combine(logps, [0.5, 0.5], "forward_kl")
    assert torch.equal(next_tokens(score, greedy=True), score.argmax(-1))
    top2 = score.topk(2, -1).indices
    drawn = next_tokens(score, greedy=False, top_k=2, generator=torch.Generator().manual_seed(0))
    assert (drawn[:, None] == top2).any(-1).all()


def random_adapter(base_path, out, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {f"a{i}": str(random_adapter(tiny_lm, root / f"a{i}", i)) for i in range(3)}


def merged_models(tiny_lm, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), p).merge_and_unload().eval()
            for p in adapters.values()]


def test_batched_adapters_equal_separate_forwards_with_cache(tiny_lm, adapters):
    from transformers import AutoModelForCausalLM

    from mocd_train.tensors import left_pad

    batched = PolicySet.from_adapters(AutoModelForCausalLM.from_pretrained(tiny_lm), adapters)
    separate = PolicySet.from_models(merged_models(tiny_lm, adapters),
                                     ref_model=AutoModelForCausalLM.from_pretrained(tiny_lm))
    ids, mask = left_pad([[5, 6, 7, 8, 9], [11, 12]], 0, "cpu")
    a, ca = batched.forward(ids, mask, None, with_ref=True)
    b, cb = separate.forward(ids, mask, None, with_ref=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a[0] - a[1]).abs().max() > 1e-2  # the adapters differ
    nxt = torch.tensor([[3], [4]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    a, _ = batched.forward(nxt, mask, ca, with_ref=True)
    b, _ = separate.forward(nxt, mask, cb, with_ref=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    full = batched.sequence_logprobs(torch.cat([ids, nxt], 1), mask, with_ref=True)[:, :, -1]
    torch.testing.assert_close(full, a, atol=1e-5, rtol=0)  # teacher-forced = cached decoding


def test_greedy_mod_with_one_policy_equals_its_greedy_decode(tiny_lm, adapters):
    from transformers import AutoModelForCausalLM

    from mocd_train.data import chat_texts
    from mocd_train.models import load_tokenizer

    tok = load_tokenizer(tiny_lm)
    one = {"a1": adapters["a1"]}
    mod = Mod(PolicySet.from_adapters(AutoModelForCausalLM.from_pretrained(tiny_lm), one), tok, [1.0],
              rule="forward_kl", greedy=True, max_new_tokens=12)
    prompts = ["hello there", "what is the capital of France?"]
    got = mod.generate(prompts)
    model = merged_models(tiny_lm, one)[0]
    for prompt, d in zip(prompts, got):
        ids = tok(chat_texts(tok, [prompt])[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
        ref = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        ref = [t for t in ref.tolist() if t not in (tok.eos_token_id, tok.pad_token_id)]
        assert d.token_ids == ref


def test_mod_errors(tiny_lm):
    from transformers import AutoModelForCausalLM

    from mocd_train.models import load_tokenizer

    llama, other = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoModelForCausalLM.from_pretrained(tiny_lm)
    other.resize_token_embeddings(400)
    with pytest.raises(ConfigError, match="one vocabulary"):
        PolicySet.from_models([llama, other])
    tok = load_tokenizer(tiny_lm)
    with pytest.raises(ConfigError, match="one per policy"):
        Mod(PolicySet.from_models([llama, llama]), tok, [1.0])
    with pytest.raises(ConfigError, match="needs π_ref"):
        Mod(PolicySet.from_models([llama, llama]), tok, [0.5, 0.5], rule="js")
    Mod(PolicySet.from_models([llama, llama]), tok, [0.5, 0.5], rule="js", jsd_approximation=True)
