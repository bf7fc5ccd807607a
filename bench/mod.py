"""MOD decoding throughput, baselines in the same run; prints JSON.

Response tokens/s for the same prompts and length (EOS ignored, so every method decodes the same number of tokens):
- single: one model through the same sampler (the baseline every ratio divides by);
- generate: the single model through transformers' generate(), for reference;
- mod_batched: M LoRA adapters on one base as one PEFT mixed-adapter batch with one KV cache (reverse-KL rule);
- mod_batched_js: the same plus π_ref rows (the JSD rule needs π_ref);
- mod_sequential_js: M + 1 full models one after another, as the MOD reference code runs them.

    python bench/mod.py --quick            # tiny random Llama and random adapters (seconds)
    python bench/mod.py                    # SmolLM2-135M with M = 3 random rank-16 adapters on all linear layers
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

from mocd_train.data import chat_texts  # noqa: E402
from mocd_train.decoding.mod import Mod, PolicySet  # noqa: E402


def adapters(base_path: str, root: Path, m: int, r: int) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i in range(m):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                               LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.01)
        model.save_pretrained(root / f"p{i}")
        out[f"p{i}"] = str(root / f"p{i}")
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num_policies", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mocd_train.assets import resolve_model
    from mocd_train.models import load_tokenizer
    from mocd_train.tiny import tiny_llama

    work = Path(tempfile.mkdtemp(prefix="bench_mod_"))
    base_path = str(tiny_llama(work / "lm")) if args.quick else resolve_model(args.model, None)
    tok = load_tokenizer(base_path)
    paths = adapters(base_path, work, args.num_policies, 4 if args.quick else 16)
    load = lambda: AutoModelForCausalLM.from_pretrained(base_path).eval()  # noqa: E731
    merged = [PeftModel.from_pretrained(load(), p).merge_and_unload().eval() for p in paths.values()]
    prompts = [f"Question {i}: how do I make my garden more welcoming to birds?" for i in range(args.prompts)]
    t, m = args.max_new_tokens, args.num_policies
    w = [1.0 / m] * m
    mk = lambda ps, weights, rule="reverse_kl": Mod(ps, tok, weights, rule, max_new_tokens=t,  # noqa: E731
                                                    batch_size=args.prompts, ignore_eos=True)
    single_model = load()
    methods = {
        "single": mk(PolicySet.from_models([single_model]), [1.0]),
        "mod_batched": mk(PolicySet.from_adapters(load(), paths), w),
        "mod_batched_js": mk(PolicySet.from_adapters(load(), paths), w, "js"),
        "mod_sequential_js": mk(PolicySet.from_models(merged, ref_model=single_model), w, "js"),
    }
    tokens = args.prompts * t
    result = {"model": "tiny-llama" if args.quick else args.model, "num_policies": m, "prompts": args.prompts,
              "max_new_tokens": t, "device": "cpu", "threads": torch.get_num_threads(), "tokens_per_s": {}}
    for name, dec in methods.items():
        torch.manual_seed(0)
        seconds = timed(lambda d=dec: d.generate(prompts, torch.Generator().manual_seed(0)), args.repeats)
        result["tokens_per_s"][name] = round(tokens / seconds, 1)
    ids = tok(chat_texts(tok, prompts), add_special_tokens=False, return_tensors="pt", padding=True,
              padding_side="left")
    seconds = timed(lambda: single_model.generate(**ids, do_sample=True, max_new_tokens=t, min_new_tokens=t,
                                                  pad_token_id=tok.pad_token_id), args.repeats)
    result["tokens_per_s"]["generate"] = round(tokens / seconds, 1)
    single = result["tokens_per_s"]["single"]
    result["vs_single"] = {k: round(v / single, 3) for k, v in result["tokens_per_s"].items() if k != "single"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
