"""What breaks only on a GPU, shown on the CPU: heads quantised by bf16, dtype choice, draws on the generator's device,
inputs longer than the value model can read, full-vocabulary logits on prefills."""

import pytest
import torch

from mocd_train.decoding.decoders import block_rule
from mocd_train.decoding.engine import BlockEngine
from mocd_train.errors import ConfigError
from mocd_train.models import load_causal_lm, resolve_dtype
from mocd_train.rewards import Normalizer
from mocd_train.values import BackboneSpec, ValueModel, build_value_model

OBJECTIVES = ["a", "b"]


def saved_value_model(lm, tok, path):
    torch.manual_seed(0)
    model, vtok = build_value_model(BackboneSpec(lm), OBJECTIVES, Normalizer(OBJECTIVES, [0.0, 0.0], [1.0, 1.0]), tok,
                                    None)
    torch.nn.init.normal_(model.head.weight, std=3.0)
    model.save(path, vtok)
    return path


def test_value_heads_stay_float32_under_bf16_weights(tiny_lm, tmp_path):
    policy, tok = load_causal_lm(tiny_lm, torch.device("cpu"))
    path = saved_value_model(tiny_lm, tok, tmp_path / "v")
    v16, vtok = ValueModel.load(path, "cpu", torch.bfloat16)
    v32, _ = ValueModel.load(path, "cpu", torch.float32)
    assert v16.head.weight.dtype == torch.float32 and next(v16.backbone.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([vtok("hello there, how are you today", add_special_tokens=False)["input_ids"]])
    out16, _ = v16(ids, torch.ones_like(ids))
    out32, _ = v32(ids, torch.ones_like(ids))
    assert out16.dtype == torch.float32
    assert (out16 != out16.bfloat16().float()).any()  # not on bf16's grid: candidates do not tie by rounding
    torch.testing.assert_close(out16, out32, atol=0.15, rtol=0.05)  # only the body's rounding differs


def test_hf_reward_heads_stay_float32_under_bf16(tiny_rm):
    from mocd_train.rewards.hf import HFRewardModel

    rm = HFRewardModel("h", tiny_rm, dtype="bfloat16", input_format="plain")
    assert rm.model.score.weight.dtype == torch.float32
    scores = rm(["a question?", "another one"], ["an answer", "another answer"])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_auto_dtype_is_bf16_only_where_the_gpu_supports_it(monkeypatch):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16


def test_draws_run_on_the_generators_device(monkeypatch):
    from mocd_train.decoding import map_d, weights

    seen = []
    real = torch.multinomial

    def spy(probs, n, generator=None):
        seen.append((probs.device, generator.device if generator is not None else None))
        return real(probs, n, generator=generator)

    monkeypatch.setattr(torch, "multinomial", spy)
    g = torch.Generator(device="cpu").manual_seed(0)
    weights.select_block(torch.randn(3, 4, 2), torch.full((3, 2), 0.5), "sample", 2.0, g)
    map_d.resample(torch.randn(3, 4, 2), torch.tensor([1.0, 0.5]), g)
    assert seen == [(g.device, g.device)] * 2


def test_value_inputs_are_cut_to_the_value_models_position_limit(tiny_lm, tiny_gpt2_lm, tmp_path):
    """Another tokenizer: the re-tokenised text is cut from the left. The same tokenizer shares one cache, which
    cannot be cut: an over-long prompt is refused by name."""
    from transformers import AutoConfig

    from mocd_train.tiny import tiny_llama

    policy, tok = load_causal_lm(tiny_lm, torch.device("cpu"))
    long_prompt = "tell me about the weather " * 60  # hundreds of tokens
    gpt2, _ = ValueModel.load(saved_value_model(tiny_gpt2_lm, tok, tmp_path / "gpt2-value"), "cpu")
    assert gpt2.max_positions == AutoConfig.from_pretrained(tiny_gpt2_lm).n_positions == 256
    other = str(tiny_llama(tmp_path / "other", vocab_size=300, seed=3))
    value, vtok = ValueModel.load(saved_value_model(other, tok, tmp_path / "other-value"), "cpu")
    assert not value.meta.shares_policy_tokenizer
    value.backbone.config.max_position_embeddings = 64
    lengths = []
    value.backbone.register_forward_hook(lambda m, args, kwargs, out: lengths.append(kwargs["input_ids"].shape[1]),
                                         with_kwargs=True)
    engine = BlockEngine(policy, tok, value, vtok, num_candidates=2, block_size=4, max_new_tokens=8, batch_size=1)
    out = engine.generate([long_prompt], block_rule("cd_uniform", 2), torch.Generator().manual_seed(0))
    assert len(out[0].token_ids) > 0 and all(c["values"] for c in out[0].trace)
    assert lengths and max(lengths) == 64  # the value model read the last 64 tokens, not all of them
    same, same_tok = ValueModel.load(saved_value_model(tiny_lm, tok, tmp_path / "llama-value"), "cpu")
    same.backbone.config.max_position_embeddings = 64
    engine = BlockEngine(policy, tok, same, same_tok, num_candidates=2, block_size=4, max_new_tokens=8, batch_size=1)
    with pytest.raises(ConfigError, match="exceeds the value model's 64 positions"):
        engine.generate([long_prompt], block_rule("cd_uniform", 2), torch.Generator().manual_seed(0))


def test_prefills_compute_only_the_last_positions_logits(tiny_lm):
    policy, tok = load_causal_lm(tiny_lm, torch.device("cpu"))
    shapes = []
    policy.register_forward_hook(lambda m, args, kwargs, out: shapes.append(tuple(out.logits.shape)), with_kwargs=True)
    engine = BlockEngine(policy, tok, None, None, None, num_candidates=1, block_size=8, max_new_tokens=4,
                         batch_size=2, ignore_eos=True)
    engine.generate(["a fairly long prompt that has many tokens in it", "short"], block_rule("pi_ref", 0))
    assert shapes and all(s[1] == 1 for s in shapes)  # [rows, 1, vocabulary] at the prefill and every step
