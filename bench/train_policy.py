"""Policy training throughput through recipes/train_policy.py: tokens/s for SFT, DPO and GRPO with LoRA, each with
full fine-tuning measured in the same run as the baseline (ratio LoRA / full); prints JSON.

    python bench/train_policy.py --quick                          # tiny random Llama, synthetic rollouts (< 1 min)
    python bench/train_policy.py --run_dir runs/smollm2-mini-hh   # SmolLM2 on the embedded default's rollouts

Tokens are TRL's own `num_tokens` count (prompt + completion tokens seen by the trainer, generation included for
GRPO); seconds are the recipe's measured training time, so model loading is excluded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from mocd_train.data import load_rollouts  # noqa: E402
from mocd_train.stages import policies  # noqa: E402


def run(run_dir: Path, model: str, objectives: list[str], method: str, lora: bool, steps: int, quick: bool) -> dict:
    extra = {"sft": ["--sft_dataset", "bench"], "dpo": ["--objective", objectives[0]],
             "grpo": ["--objective", objectives[0], "--num_generations", "4",
                      "--max_completion_length", "16" if quick else "48"]}[method]
    name = f"{method}-{'lora' if lora else 'full'}"
    with contextlib.redirect_stdout(sys.stderr):  # trainer logs; stdout carries the JSON only
        out = policies.main(["--run_dir", str(run_dir), "--model", model, "--objectives", f"[{', '.join(objectives)}]",
                             "--report_to", "none", "--method", method, "--name", name,
                             "--use_lora", str(lora).lower(), "--max_steps", str(steps), "--logging_steps", "1",
                             "--per_device_train_batch_size", "8", "--learning_rate", "1e-4",
                             "--max_length", "128" if quick else "256", *extra])
    summary = json.loads((out / "DONE.json").read_text())
    tokens = summary["last_logs"][-1]["num_tokens"]
    return {"tokens": tokens, "seconds": round(summary["train_seconds"], 2),
            "tokens_per_s": round(tokens / summary["train_seconds"], 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and synthetic rollouts")
    parser.add_argument("--run_dir", default="runs/smollm2-mini-hh", help="a run with rollouts (full mode)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per measurement")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from datasets import Dataset

    from mocd_train.tiny import synthetic_rollouts, tiny_llama

    work = Path(tempfile.mkdtemp(prefix="bench_policy_"))
    if args.quick:
        model, objectives, steps = str(tiny_llama(work / "lm")), ["readability", "positivity"], args.steps or 4
        synthetic_rollouts(work / "run", model, tuple(objectives), num_prompts=32)
    else:
        model, steps = args.model, args.steps or 6
        if not (Path(args.run_dir) / "rollouts" / "DONE.json").is_file():
            raise SystemExit(f"{args.run_dir} has no complete rollouts: run `make run` (or recipes/rollouts.py) first.")
        shutil.copytree(Path(args.run_dir) / "rollouts", work / "run" / "rollouts")
        objectives = json.loads((work / "run" / "rollouts" / "normalization.json").read_text())["objectives"]
    rows, _ = load_rollouts(work / "run")
    Dataset.from_list([{"prompt": r["prompt"], "response": r["response"]} for r in rows]).save_to_disk(
        str(work / "run" / "teach" / "bench" / "dataset"))

    result = {"model": "tiny-llama" if args.quick else model, "steps": steps, "batch_size": 8, "methods": {}}
    for method in ("sft", "dpo", "grpo"):
        lora = run(work / "run", model, objectives, method, True, steps, args.quick)
        full = run(work / "run", model, objectives, method, False, steps, args.quick)
        result["methods"][method] = {"lora": lora, "full": full,
                                     "lora_vs_full": round(lora["tokens_per_s"] / full["tokens_per_s"], 3)}
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
