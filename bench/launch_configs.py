"""Launch the rollouts recipe under accelerate configs with tiny local models; prints JSON per config.

Checks that each config starts, finishes and writes the same rows as the first one (same seed, same device).
Needs no embedded assets (a prompts file and a tiny local reward model), so it runs on bare GPU machines.

    python bench/launch_configs.py --configs single_gpu multi_gpu deepspeed_zero2 deepspeed_zero3 fsdp
    python bench/launch_configs.py --configs cpu
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["cpu"])
    parser.add_argument("--num_processes", type=int, default=1)
    args = parser.parse_args()

    from mocd_train.tiny import tiny_gpt2_reward_model, tiny_llama

    work = Path(tempfile.mkdtemp())
    lm, rm = tiny_llama(work / "lm"), tiny_gpt2_reward_model(work / "rm")
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(f"Question {i}: how do I bake bread number {i}?" for i in range(12)))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results, first = {}, None
    for name in args.configs:
        run_dir = work / f"run-{name}"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / f"{name}.yaml"), "--num_processes", str(args.num_processes),
               str(ROOT / "recipes" / "rollouts.py"), "--run_dir", str(run_dir), "--model", str(lm),
               "--prompts_file", str(prompts), "--objectives", f"[{{name: rm, type: hf_reward_model, model: {rm}}}]",
               "--report_to", "none", "--num_samples", "2", "--chunk_size", "4", "--max_new_tokens", "16"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        entry = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        if proc.returncode == 0:
            from datasets import load_from_disk

            ds = load_from_disk(str(run_dir / "rollouts" / "dataset"))
            rows = sorted((r["prompt_id"], r["sample"], tuple(r["response_ids"])) for r in ds)
            first = rows if first is None else first
            entry.update(rows=len(rows), same_rows_as_first=rows == first)
        else:
            entry["stderr_tail"] = proc.stderr[-1500:]
        results[name] = entry
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
