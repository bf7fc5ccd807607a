"""Stage `teach`: decode prompts with a decoding-time teacher (RMOD, CD-*, Best-of-K, MAP-D, π_ref) and write
its outputs as a dataset, with each prompt's decode trace (per block: candidates' values, weights, choice).

    python recipes/teach.py --config recipes/smollm2-mini-hh/pipeline.yaml --decoder rmod --rmod_lambda 5
    accelerate launch --config_file accelerate_configs/cpu.yaml --num_processes 2 recipes/teach.py --config ...

Writes <run_dir>/teach/<name>/dataset (+ DONE.json). Resumable: finished chunks are files written atomically; a
killed run redoes only the missing ones, and chunk c is decoded with its own seed, so the result does not depend on
interruptions or on the number of processes.
"""

import json
import time
from pathlib import Path

import torch

from mocd_train.assets import load_prompts
from mocd_train.cli import run_stage
from mocd_train.data import chunk_seed, read_chunks, rollouts_config, run_chunks, save_dataset
from mocd_train.decoding.backends import load_sampler
from mocd_train.decoding.decoders import make_decoder
from mocd_train.errors import ConfigError
from mocd_train.models import model_source, policy_dir, resolve_device
from mocd_train.palette import load_palette
from mocd_train.rewards import Normalizer, RewardSet, parse_objectives
from mocd_train.rundir import stage_dir
from mocd_train.stage import Stage
from mocd_train.tracking import start_run
from mocd_train.values import check_objectives


def teacher_inputs(cfg) -> dict:
    """The upstream outputs a decoder reads: the value model, the palette, the combined policies."""
    inputs = {}
    if cfg.decoder not in ("pi_ref", "map_d", "mod", "soup") and cfg.score_with == "value":
        inputs["value"] = Path(cfg.value_model) if cfg.value_model else stage_dir(cfg.run_dir, "value")
    if cfg.decoder == "map_d":
        names = [s.name for s in parse_objectives(cfg.objectives)]
        inputs["palette"] = Path(load_palette(cfg.palette, names, cfg.run_dir)["path"]).parent
    if cfg.decoder in ("mod", "soup"):
        inputs.update({f"policy_{i}": policy_dir(cfg.run_dir, p) for i, p in enumerate(cfg.policies)})
    return inputs


def main(argv=None):
    # parse
    cfg, stage = Stage.open("teach", argv, lambda c: f"teach/{c.name or c.decoder}")
    name, state, out = cfg.name or cfg.decoder, stage.state, stage.dir
    rollouts_dir = stage_dir(cfg.run_dir, "rollouts")
    ro = rollouts_config(cfg.run_dir)
    split = load_prompts(ro["prompt_sources"], cfg.split, ro["heldout_fraction"], None, ro["prompts_file"])
    prompts = split[cfg.first_prompt:][: cfg.max_prompts]
    if not prompts:
        raise ConfigError(f"first_prompt: {cfg.first_prompt} skips every prompt; the {cfg.split} split has "
                          f"{len(split)}.")
    stage.require(prompts=[p.id for p in prompts], rollouts=rollouts_dir, model=model_source(cfg.model),
                  **teacher_inputs(cfg))
    if stage.complete:
        print(f"teacher {name} already complete: {out}")
        return out

    # load: the normalisation of this run's rollouts, the policy, the scorers
    names = [s.name for s in parse_objectives(cfg.objectives)]
    normalizer = Normalizer.load(rollouts_dir / "normalization.json")
    check_objectives(names, normalizer.objectives, f"the rollouts in {cfg.run_dir}", "Use their objectives.")
    device = resolve_device(cfg.device, state.device)
    policy, tokenizer = load_sampler(cfg, device, state.num_processes)  # a HF model or a vLLM engine
    rewards = RewardSet.from_config(cfg.objectives, device, cfg.cache_dir, normalizer=normalizer)

    # build
    decoder = make_decoder(cfg, policy, tokenizer, rewards, names)
    stage.start()

    # run: each process decodes its share of chunks
    def work(c, chunk):
        generator = torch.Generator(device=policy.device).manual_seed(chunk_seed(cfg.seed, c))
        torch.manual_seed(chunk_seed(cfg.seed, c))  # MAP-D samples through generate()
        t0 = time.perf_counter()
        decoded = decoder.generate([p.text for p in chunk], generator)
        seconds = time.perf_counter() - t0
        scores = rewards.score([p.text for p in chunk], [d.text for d in decoded])
        rows = []
        for p, d, r in zip(chunk, decoded, scores.tolist()):
            rows.append({"prompt_id": p.id, "prompt": p.text, "source": p.source, "category": p.category,
                         "harmful": p.harmful, "response": d.text, "response_ids": d.token_ids,
                         "finished": d.finished, "num_response_tokens": len(d.token_ids), "decoder": decoder.name,
                         "teacher": name, "params": json.dumps(decoder.params), "trace": json.dumps(d.trace),
                         "values": d.values or [], **{f"reward_{g}": float(v) for g, v in zip(names, r)},
                         **{f"cost_{k}": float(v) for k, v in d.cost.items()}})
        tokens = sum(len(d.token_ids) + d.finished for d in decoded)
        return rows, tokens, seconds, {"seconds": seconds}

    run_chunks(prompts, cfg.chunk_size, out / "shards", work, rank=state.process_index,
               world_size=state.num_processes, desc=f"teach {name}", unit="prompt")
    state.wait_for_everyone()

    # save + log (main process)
    if state.is_main_process:
        shards = read_chunks(out / "shards", prompts, cfg.chunk_size, f"teach {name}")
        rows = [r for s in shards for r in s["rows"]]
        save_dataset(rows, out / "dataset")
        raw = torch.tensor([[r[f"reward_{g}"] for g in names] for r in rows], dtype=torch.float64)
        norm = normalizer(raw)
        seconds = sum(s["seconds"] for s in shards)
        summary = {"teacher": name, "decoder": decoder.name, "params": decoder.params, "split": cfg.split,
                   "prompts": len(rows), "mean_raw_reward": dict(zip(names, raw.mean(0).tolist())),
                   "mean_normalized_reward": dict(zip(names, norm.mean(0).tolist())),
                   "mean_worst_case": float(norm.min(1).values.mean()),
                   "policy_tokens": sum(r["cost_policy_tokens"] for r in rows),
                   "value_tokens": sum(r.get("cost_value_tokens", 0.0) for r in rows),
                   "response_tokens": sum(s["new_tokens"] for s in shards), "decode_seconds": seconds,
                   "response_tokens_per_second": sum(s["new_tokens"] for s in shards) / max(seconds, 1e-9),
                   "dataset": str(out / "dataset")}
    stage.finish(summary if state.is_main_process else {})
    if state.is_main_process:
        run = start_run(cfg, f"teach-{name}")
        if run is not None:
            run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            run.finish()
        print(f"teacher {name}: {len(rows)} prompts, mean normalised reward "
              + ", ".join(f"{g} {v:+.3f}" for g, v in summary["mean_normalized_reward"].items())
              + f", mean worst case {summary['mean_worst_case']:+.3f} → {out / 'dataset'}")
    return out


if __name__ == "__main__":
    run_stage(main)
