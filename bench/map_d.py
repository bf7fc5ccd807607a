"""MAP-D on held-out prompts: does resampling k π_ref samples with softmax(λᵀr) realise the palette λ was solved
for? Prints JSON: per objective the target, π_ref's mean, MAP-D's realised mean ± standard error (over prompts) and
the gap in standard errors; plus cost.

    python bench/map_d.py --run_dir runs/smollm2-mini-hh --palette hh-65 [--prompts 96 --k 16]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parents[1]))

from mocd_train.assets import load_prompts  # noqa: E402
from mocd_train.data import rollouts_config  # noqa: E402
from mocd_train.decoding.map_d import MapD  # noqa: E402
from mocd_train.models import load_causal_lm, resolve_device  # noqa: E402
from mocd_train.palette import load_palette  # noqa: E402
from mocd_train.rewards import RewardSet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/smollm2-mini-hh")
    parser.add_argument("--palette", default="hh-65", help="name under <run_dir>/palette/ or a path")
    parser.add_argument("--prompts", type=int, default=96, help="held-out prompts")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch_prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ro = rollouts_config(args.run_dir)
    names = [o if isinstance(o, str) else o["name"] for o in ro["objectives"]]
    palette = load_palette(args.palette, names, args.run_dir)
    prompts = load_prompts(ro["prompt_sources"], "heldout", ro["heldout_fraction"], args.prompts, ro["prompts_file"])
    device = resolve_device("auto", "cuda" if torch.cuda.is_available() else "cpu")
    policy, tokenizer = load_causal_lm(ro["model"], device, "auto", ro.get("cache_dir"))
    scorer = RewardSet.from_config(ro["objectives"], device, ro.get("cache_dir"))
    decoder = MapD(policy, tokenizer, scorer, torch.tensor(palette["lam"]), args.k, ro["max_new_tokens"],
                   ro["temperature"], ro["top_p"], ro["system_prompt"])
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    out, t0 = [], time.perf_counter()
    for i in tqdm(range(0, len(prompts), args.batch_prompts), desc="MAP-D", unit="batch"):
        out += decoder.generate([p.text for p in prompts[i : i + args.batch_prompts]], g)
    seconds = time.perf_counter() - t0
    chosen = torch.tensor([o.values for o in out], dtype=torch.float64)  # [N, m]
    cands = torch.tensor([o.trace[0]["candidate_rewards"] for o in out], dtype=torch.float64)  # [N, k, m]
    weights = torch.tensor([o.trace[0]["selection_weights"] for o in out], dtype=torch.float64)  # [N, k]
    expected = (weights[..., None] * cands).sum(1)  # E over the resampling draw: same mean, lower variance
    n = len(out)
    result = {"palette": palette["path"], "lam": palette["lam"], "prompts": n, "k": args.k, "objectives": {}}
    for i, name in enumerate(names):
        ref = cands[:, 0, i]  # one plain π_ref sample per prompt
        se = float(chosen[:, i].std() / math.sqrt(n))
        result["objectives"][name] = {
            "target": palette["target"][i], "pilot_reference_c0": palette["reference"][i],
            "heldout_pi_ref_mean": float(cands[:, :, i].mean()), "heldout_pi_ref_se": float(ref.std() / math.sqrt(n)),
            "map_d_mean": float(chosen[:, i].mean()), "map_d_se": se,
            "map_d_expected_mean": float(expected[:, i].mean()),
            "map_d_expected_se": float(expected[:, i].std() / math.sqrt(n)),
            "gap_in_se": float((chosen[:, i].mean() - palette["target"][i]) / se),
            "within_2se": bool(abs(chosen[:, i].mean() - palette["target"][i]) <= 2 * se),
        }
    tokens = sum(o.cost["policy_tokens"] for o in out)
    result.update(seconds=seconds, policy_tokens=tokens, tokens_per_second=tokens / seconds,
                  mean_selection_ess=float((1 / (weights**2).sum(1)).mean()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
