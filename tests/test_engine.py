import pytest
import torch

from mocd_train.decoding.decoders import block_rule
from mocd_train.decoding.engine import BlockEngine
from mocd_train.models import load_causal_lm
from mocd_train.rewards import Normalizer
from mocd_train.values import BackboneSpec, build_value_model

PROMPTS = ["How do I bake bread?", "What is the capital of France?", "Tell me a joke about cats.", "hi",
           "The quick brown fox"]


def eos_prone(path, boost=3.5):
    """The tiny policy, with its EOS logit raised (P ≈ 8 % a step) so that some branches end inside a block."""
    policy, tok = load_causal_lm(path, torch.device("cpu"))

    def raise_eos(module, inputs, logits):
        logits[..., tok.eos_token_id] += boost
        return logits

    policy.get_output_embeddings().register_forward_hook(raise_eos)
    return policy, tok


def value_for(path, tok, init_from="causal_lm", seed=0):
    torch.manual_seed(seed)
    norm = Normalizer(["a", "b"], [0.0, 0.0], [1.0, 1.0])
    model, vtok = build_value_model(BackboneSpec(path, init_from), ["a", "b"], norm, tok, None)
    torch.nn.init.normal_(model.head.weight)
    return model.eval(), vtok


def decode(policy, tok, value, vtok, reuse, decoder="rmod", seed=0, **kw):
    args = dict(num_candidates=3, block_size=4, max_new_tokens=20, batch_size=3) | kw
    engine = BlockEngine(policy, tok, value, vtok, reuse_cache=reuse, **args)
    rule = block_rule(decoder, 2, rmod_lambda=5.0, selection="sample")
    return engine.generate(PROMPTS, rule, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2"])
def test_cached_engine_yields_the_tokens_of_the_naive_reencoding_loop(kind, tiny_lm, tiny_gpt2_lm, tmp_path):
    from mocd_train.tiny import tiny_gemma2

    path = {"llama": tiny_lm, "gpt2": tiny_gpt2_lm}.get(kind) or str(tiny_gemma2(tmp_path / "gemma2"))
    policy, tok = eos_prone(path)
    value, vtok = value_for(path, tok)
    fast, naive = decode(policy, tok, value, vtok, True), decode(policy, tok, value, vtok, False)
    assert any(d.finished for d in fast) and not all(d.finished for d in fast)  # EOS inside blocks, and not
    for a, b in zip(fast, naive):
        assert a.token_ids == b.token_ids and a.finished == b.finished
        assert [t["chosen"] for t in a.trace] == [t["chosen"] for t in b.trace]
        for ta, tb in zip(a.trace, b.trace):
            torch.testing.assert_close(torch.tensor(ta["values"]), torch.tensor(tb["values"]), atol=1e-4, rtol=0)
    assert fast[0].cost["value_tokens"] < naive[0].cost["value_tokens"]
    # finished prompts leave the batch: fewer policy tokens than K·T per prompt
    assert sum(d.cost["policy_tokens"] for d in fast) < len(PROMPTS) * 3 * 20


def scored_as_in_training(value, vtok, decoded):
    """The value model on the decoded response laid out as a training example (`value_example`, what the value stage
    trains on): its value at the last token must be what the decoder recorded for the kept branch."""
    from mocd_train.values import value_example

    for d in decoded:
        row = {"prompt": d.prompt, "response": d.text, "response_ids": d.token_ids, "finished": d.finished,
               "prompt_id": "p"}
        ids = torch.tensor([value_example(vtok, value.meta, row, [0.0, 0.0], 10_000)["input_ids"]])
        direct, _ = value(ids, torch.ones_like(ids))
        torch.testing.assert_close(torch.tensor(d.values), direct[0, -1], atol=1e-4, rtol=0)


def test_a_decoded_response_is_scored_exactly_as_the_same_response_in_training(tiny_lm):
    policy, tok = eos_prone(tiny_lm, boost=0.0)
    value, vtok = value_for(tiny_lm, tok)
    out = decode(policy, tok, value, vtok, True, decoder="cd_uniform")
    scored_as_in_training(value, vtok, out)
    for d in out:
        assert len(d.trace) == -(-len(d.token_ids + [0] * d.finished) // 4)  # one entry per block decoded


def test_value_model_with_another_tokenizer_reads_retokenised_text_as_in_training(tiny_lm, tmp_path):
    from mocd_train.tiny import tiny_llama

    other = str(tiny_llama(tmp_path / "other", vocab_size=300, seed=3))
    policy, tok = eos_prone(tiny_lm, boost=0.0)
    value, vtok = value_for(other, tok)
    assert not value.meta.shares_policy_tokenizer
    scored_as_in_training(value, vtok, decode(policy, tok, value, vtok, True, max_new_tokens=8))


@pytest.mark.parametrize("kind", ["llama-chat", "gpt2-reward-model", "gemma2-window"])
def test_another_tokenizers_value_cache_scores_as_the_full_reencoding_with_fewer_tokens(kind, tiny_lm, tmp_path,
                                                                                         monkeypatch):
    """The paper setup (value model with its own tokenizer): the incremental cache — common prefix kept, the
    re-tokenised tail re-encoded, stale entries masked — gives the values of re-encoding every prefix. Gemma-2's
    attention window of 8 forces the from-scratch fallback once the cache outgrows it."""
    from mocd_train.decoding import scoring
    from mocd_train.tiny import tiny_gemma2, tiny_gpt2_reward_model, tiny_llama

    path, init = {"llama-chat": (lambda: tiny_llama(tmp_path / "v", vocab_size=300, seed=3), "causal_lm"),
                  "gpt2-reward-model": (lambda: tiny_gpt2_reward_model(tmp_path / "r", vocab_size=320), "reward_model"),
                  "gemma2-window": (lambda: tiny_gemma2(tmp_path / "g", seed=4, vocab_size=280), "causal_lm")}[kind]
    policy, tok = eos_prone(tiny_lm)
    value, vtok = value_for(str(path()), tok, init_from=init)
    assert not value.meta.shares_policy_tokenizer
    rolled_back = []
    prefix = scoring.common_prefix

    def spy(a, b):
        out = prefix(a, b)
        rolled_back.extend(n < len(x) for n, x in zip(out, a))
        return out

    monkeypatch.setattr(scoring, "common_prefix", spy)
    fast = decode(policy, tok, value, vtok, True, max_new_tokens=24)
    naive = decode(policy, tok, value, vtok, False, max_new_tokens=24)
    for a, b in zip(fast, naive):
        assert a.token_ids == b.token_ids and [t["chosen"] for t in a.trace] == [t["chosen"] for t in b.trace]
        for ta, tb in zip(a.trace, b.trace):
            torch.testing.assert_close(torch.tensor(ta["values"]), torch.tensor(tb["values"]), atol=1e-4, rtol=0)
    if kind != "gemma2-window":  # (the window forces re-encoding from scratch: the naive cost, same values)
        assert any(rolled_back)  # some re-tokenised tails did change ids already in the cache
        spent = [sum(d.cost["value_tokens"] for d in run) for run in (fast, naive)]
        assert spent[0] < spent[1] / 2, spent


def test_value_model_for_another_policys_tokens_is_refused(tiny_lm, tmp_path):
    from mocd_train.tiny import tiny_llama

    other = str(tiny_llama(tmp_path / "other", vocab_size=300, seed=3))
    policy, tok = load_causal_lm(tiny_lm, torch.device("cpu"))
    other_policy, other_tok = load_causal_lm(other, torch.device("cpu"))
    value, vtok = value_for(other, other_tok)  # trained to read the other policy's ids
    with pytest.raises(ValueError, match="another policy's token ids"):
        BlockEngine(policy, tok, value, vtok)
    with pytest.raises(ValueError, match="tokenizer"):
        BlockEngine(policy, tok, value, None)


def test_best_of_k_by_reward_functions_keeps_the_best_candidate(tiny_lm):
    from mocd_train.rewards import RewardSet

    policy, tok = eos_prone(tiny_lm, boost=0.0)
    scorer = RewardSet.from_config(["readability", "non_toxicity"])
    scorer.normalizer = Normalizer(["readability", "non_toxicity"], [50.0, 0.5], [20.0, 0.2])
    engine = BlockEngine(policy, tok, reward_set=scorer, num_candidates=4, block_size=10, max_new_tokens=10)
    out = engine.generate(PROMPTS[:3], block_rule("best_of_k", 2), torch.Generator().manual_seed(0))
    for d in out:
        (block,) = d.trace
        totals = torch.tensor(block["values"]).sum(-1)
        assert block["chosen"] == int(totals.argmax())
        raw = scorer.score([d.prompt], [d.text], normalize=True)[0]
        torch.testing.assert_close(raw.float(), torch.tensor(d.values), atol=1e-4, rtol=0)


class NaNRewards:
    """Reward functions that return NaN for one objective at the second block (as an overflowing head would)."""

    names = ["helpfulness", "harmlessness"]

    def __init__(self):
        self.calls = 0

    def score(self, prompts, texts, normalize=True):
        self.calls += 1
        out = torch.zeros(len(texts), 2)
        if self.calls == 2:
            out[1, 1] = float("nan")
        return out


def test_a_non_finite_value_stops_decoding_naming_prompt_block_and_objective(tiny_lm):
    from mocd_train.errors import NonFiniteError

    policy, tok = load_causal_lm(tiny_lm, torch.device("cpu"))
    engine = BlockEngine(policy, tok, None, None, NaNRewards(), num_candidates=3, block_size=2, max_new_tokens=8,
                         batch_size=2, ignore_eos=True)
    with pytest.raises(NonFiniteError, match=r"reward functions: nan for prompt 0 \('How do I bake bread\?'\), "
                                             r"block 1, candidate 1, harmlessness"):
        engine.generate(PROMPTS[:2], block_rule("rmod", 2, rmod_lambda=5.0), torch.Generator().manual_seed(0))


class ZeroRewards:
    names = ["a", "b"]

    def score(self, prompts, texts, normalize=True):
        return torch.zeros(len(texts), 2)


class ScriptedBackend:
    """A sampling backend that is not a model: branch c of an open prompt emits token 10·(c+1) + block for B steps,
    and prompt 1's branch 2 emits the stop token at its second block. The engine may only learn tokens through
    `sample` and may only steer through `keep`."""

    device, pad = torch.device("cpu"), 0

    def __init__(self, stop):
        self.stop, self.stop_ids, self.cost, self.log = stop, [stop], {"policy_tokens": 0}, []

    def open(self, prompt_ids, k):
        self.open_prompts, self.k, self.block = list(range(len(prompt_ids))), k, 0

    def sample(self, b, last, generator):
        rows = len(self.open_prompts) * self.k
        toks = torch.tensor([[10 * (c + 1) + self.block] * b for _ in self.open_prompts for c in range(self.k)])
        mask, alive = torch.ones_like(toks), torch.ones(rows, dtype=torch.bool)
        for j, p in enumerate(self.open_prompts):
            if p == 1 and self.block == 1:
                toks[j * self.k + 2, 1:], mask[j * self.k + 2, 2:], alive[j * self.k + 2] = self.stop, 0, False
        self.cost["policy_tokens"] += rows * b
        return toks, mask, alive

    def keep(self, winners, survivors):
        self.log.append((winners.tolist(), list(survivors)))
        self.open_prompts = [self.open_prompts[j] for j in survivors]
        self.block += 1


def test_the_engine_decodes_through_any_backend_by_its_sample_and_keep_contract(tiny_lm):
    policy, tok = load_causal_lm(tiny_lm, torch.device("cpu"))
    backend = ScriptedBackend(tok.eos_token_id)

    def third_branch_then_first(values, generator):  # a rule: branch 2 at block 0 and 1, branch 0 after
        n, k, _ = values.shape
        return torch.full((n,), 2 if backend.block < 2 else 0), [{} for _ in range(n)]

    engine = BlockEngine(policy, tok, None, None, ZeroRewards(), num_candidates=3, block_size=3, max_new_tokens=9,
                         backend=backend)
    out = engine.generate(PROMPTS[:3], third_branch_then_first)
    eos = tok.eos_token_id
    assert out[0].token_ids == [30] * 3 + [31] * 3 + [12] * 3 and not out[0].finished
    assert out[1].token_ids == [30] * 3 + [31] and out[1].finished  # its chosen branch stopped: stop token dropped
    assert backend.log[1] == ([2, 5, 8], [0, 2])  # winners are rows (prompt-major); prompt 1 left the batch
    assert backend.log[2] == ([0, 3], [0, 1])
    assert out[0].cost["policy_tokens"] == (9 + 9 + 6) * 3 / 3 and eos not in out[1].token_ids
