"""Rollout throughput (responses/s, tokens/s) and each scorer's seconds per 100 texts; prints JSON.

    python bench/rollouts.py            # SmolLM2-135M on this machine: 2 chunks of 16 prompts x K=4, 48 tokens
    python bench/rollouts.py --quick    # tiny random Llama, same code path, < 1 min
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mocd_train.assets import SMOLLM2, load_prompts  # noqa: E402
from mocd_train.data import sample_responses  # noqa: E402
from mocd_train.models import load_causal_lm  # noqa: E402
from mocd_train.rewards import build_reward, parse_objectives, reward_types  # noqa: E402
from mocd_train.rewards.text import sentence_encoder  # noqa: E402
from mocd_train.tiny import tiny_llama  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--chunk_size", type=int, default=16)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args()

    model_name = tiny_llama(tempfile.mkdtemp()) if args.quick else SMOLLM2
    model, tokenizer = load_causal_lm(str(model_name), torch.device("cpu"))
    prompts = [p.text for p in load_prompts(split="train", max_prompts=args.chunks * args.chunk_size)]

    sample_responses(model, tokenizer, prompts[:2], 1, 4)  # warm-up
    responses, seconds, tokens = [], 0.0, 0
    for c in range(args.chunks):
        chunk = prompts[c * args.chunk_size : (c + 1) * args.chunk_size]
        torch.manual_seed(c)
        t0 = time.perf_counter()
        rows = sample_responses(model, tokenizer, chunk, args.num_samples, args.max_new_tokens)
        seconds += time.perf_counter() - t0
        tokens += sum(r["num_response_tokens"] + r["finished"] for r in rows)
        responses += [(chunk[i // args.num_samples], r["response"]) for i, r in enumerate(rows)]

    texts = (responses * (100 // len(responses) + 1))[:100]
    scorers = {}
    for name in reward_types():
        if name == "hf_reward_model":
            continue
        fn = build_reward(parse_objectives([name])[0])
        fn([texts[0][0]], [texts[0][1]])  # loading and probe fitting are not scoring time
        sentence_encoder("cpu").memo.clear()  # embeddings are shared between scorers; time each one cold
        t0 = time.perf_counter()
        fn([p for p, _ in texts], [r for _, r in texts])
        scorers[name] = round(time.perf_counter() - t0, 4)

    print(json.dumps({
        "model": "tiny-llama (random)" if args.quick else SMOLLM2,
        "threads": torch.get_num_threads(),
        "batch_rows": args.chunk_size * args.num_samples, "max_new_tokens": args.max_new_tokens,
        "responses": len(responses), "generation_seconds": round(seconds, 3),
        "responses_per_second": round(len(responses) / seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1),
        "mean_response_tokens": round(tokens / len(responses), 1),
        "scorer_seconds_per_100_texts": scorers,
        "note": "scorer times exclude model loading and harmlessness probe fitting (cached after the first run)",
    }, indent=2))


if __name__ == "__main__":
    main()
