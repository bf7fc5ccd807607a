"""Value model costs, with their baselines measured in the same run; prints JSON.

- training tokens/s of the value trainer (a few optimiser steps on the rollouts);
- all-prefix scoring: one forward per sequence vs recomputing every prefix from scratch (tokens processed over the
  whole training set, and wall time on a sample, with the largest difference between the two as a check);
- decoding-time block scoring: K candidate blocks of B tokens scored from the cache vs re-encoding prefix + block.

    python bench/value.py --quick                               # tiny random model, synthetic rollouts (< 1 min)
    python bench/value.py --run_dir runs/smollm2-mini-hh        # the embedded default's rollouts, SmolLM2 backbone
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from mocd_train.data import load_rollouts  # noqa: E402
from mocd_train.models import load_tokenizer  # noqa: E402
from mocd_train.values import (  # noqa: E402
    BackboneSpec,
    ValueModel,
    build_value_model,
    collate_values,
    value_datasets,
    value_trainer_class,
)


def train_throughput(model, tokenizer, examples, steps: int, batch_size: int) -> float:
    from datasets import Dataset
    from transformers import TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=5e-5, use_cpu=not torch.cuda.is_available(), report_to="none",
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                 remove_unused_columns=False, train_sampling_strategy="group_by_length",
                                 length_column_name="length")
        trainer = value_trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(examples),
                                        data_collator=partial(collate_values, pad_id=tokenizer.pad_token_id))
        trainer.train()  # warm-up pass excluded below: time a second run of the same steps
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    seen = sorted(examples, key=lambda e: e["length"])  # group_by_length: use the mean length as the estimate
    mean_len = sum(e["length"] for e in seen) / len(seen)
    return steps * batch_size * mean_len / seconds


@torch.no_grad()
def all_prefix_scoring(model, examples) -> dict:
    one_pass = sum(e["length"] for e in examples)
    per_prefix = sum(sum(e["response_start"] + t for t in range(1, e["length"] - e["response_start"] + 1))
                     for e in examples)
    sample = examples[:8]
    t0 = time.perf_counter()
    fast = []
    for e in sample:
        ids = torch.tensor([e["input_ids"]])
        values, _ = model(ids, torch.ones_like(ids))
        fast.append(values[0, e["response_start"]:])
    t1 = time.perf_counter()
    diff = 0.0
    for e, f in zip(sample, fast):
        for t in range(e["response_start"] + 1, e["length"] + 1):
            ids = torch.tensor([e["input_ids"][:t]])
            values, _ = model(ids, torch.ones_like(ids))
            diff = max(diff, float((values[0, -1] - f[t - e["response_start"] - 1]).abs().max()))
    t2 = time.perf_counter()
    return {"tokens_one_pass": one_pass, "tokens_per_prefix_recompute": per_prefix,
            "tokens_ratio": per_prefix / one_pass, "sample_sequences": len(sample),
            "seconds_one_pass": t1 - t0, "seconds_per_prefix_recompute": t2 - t1,
            "time_ratio": (t2 - t1) / (t1 - t0), "max_abs_diff": diff}


@torch.no_grad()
def block_scoring(model, examples, k: int, b: int, t_max: int) -> dict:
    """One prompt at a time, T/B blocks of K candidates: cached extension vs re-encoding prefix + block."""
    prompts = [e["input_ids"][: e["response_start"]] for e in examples[:4]]
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(10, 200, (t_max // b, k, b), generator=g) for _ in prompts]
    cached_tokens = naive_tokens = 0
    t0 = time.perf_counter()
    for p, bl in zip(prompts, blocks):
        ids = torch.tensor([p])
        _, state = model.prefill(ids, torch.ones_like(ids))
        cached_tokens += len(p)
        for blk in bl:
            _, state = model.score_blocks(state, blk[None], torch.ones_like(blk[None]))
            state = state.select(torch.tensor([0]))
            cached_tokens += k * b
    t1 = time.perf_counter()
    for p, bl in zip(prompts, blocks):
        prefix = list(p)
        for blk in bl:
            full = torch.tensor([prefix + blk[j].tolist() for j in range(k)])
            model(full, torch.ones_like(full))
            naive_tokens += full.numel()
            prefix += blk[0].tolist()
    t2 = time.perf_counter()
    return {"K": k, "B": b, "T": t_max, "prompts": len(prompts), "tokens_cached": cached_tokens,
            "tokens_reencode": naive_tokens, "tokens_ratio": naive_tokens / cached_tokens,
            "seconds_cached": t1 - t0, "seconds_reencode": t2 - t1, "time_ratio": (t2 - t1) / (t1 - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and synthetic rollouts")
    parser.add_argument("--run_dir", default="runs/smollm2-mini-hh", help="a run with complete rollouts")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num_layers", type=int, default=8, help="value backbone: π_ref's first N layers")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)

    tmp = tempfile.TemporaryDirectory()
    if args.quick:
        from mocd_train.tiny import synthetic_rollouts, tiny_llama

        args.model = str(tiny_llama(Path(tmp.name) / "lm"))
        args.run_dir, args.num_layers, args.steps = str(Path(tmp.name) / "run"), None, 30
        synthetic_rollouts(args.run_dir, args.model, num_prompts=64)
    rollouts, normalizer = load_rollouts(args.run_dir)
    from mocd_train.assets import resolve_model

    policy_tokenizer = load_tokenizer(resolve_model(args.model))
    spec = BackboneSpec(args.model, "causal_lm", args.num_layers, "full")
    model, tokenizer = build_value_model(spec, normalizer.objectives, normalizer, policy_tokenizer, None)
    train, _, _ = value_datasets(rollouts, tokenizer, model.meta, normalizer, 512, 0.1)
    result = {"quick": args.quick, "backbone": args.model, "num_layers": args.num_layers,
              "threads": torch.get_num_threads(), "train_sequences": len(train),
              "train_tokens_per_second": train_throughput(model, tokenizer, train, args.steps, 8)}
    trained = Path(args.run_dir) / "value" / "model"
    if trained.is_dir():  # score with the run's trained value model when there is one
        model, _ = ValueModel.load(trained, objectives=normalizer.objectives)
    else:  # a random head, so the equality check compares non-trivial values
        torch.nn.init.normal_(model.head.weight, std=0.1)
    model.eval()
    result["scoring_model"] = str(trained) if trained.is_dir() else "fresh, random head"
    result["all_prefix_scoring"] = all_prefix_scoring(model, train)
    result["block_scoring"] = block_scoring(model, train, k=4, b=8, t_max=64)
    print(json.dumps(result, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
