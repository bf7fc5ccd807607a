"""Stage `rollouts`: K responses per prompt from π_ref, scored by every objective, with normalisation stats.

    python recipes/rollouts.py --config recipes/smollm2-mini-hh/pipeline.yaml [--key value ...]
    accelerate launch --config_file accelerate_configs/cpu.yaml --num_processes 2 recipes/rollouts.py --config ...

Resumable: a killed run continues from its last finished chunk; a complete one is skipped.
"""

from mocd_train.assets import load_prompts
from mocd_train.cli import run_stage
from mocd_train.data import merge_rollouts, write_rollout_shards
from mocd_train.decoding.backends import load_sampler
from mocd_train.models import model_source, resolve_device
from mocd_train.rewards import RewardSet, parse_objectives
from mocd_train.stage import Stage
from mocd_train.tracking import start_run


def main(argv=None):
    # parse
    cfg, stage = Stage.open("rollouts", argv, "rollouts")
    state, out = stage.state, stage.dir
    prompts = load_prompts(cfg.prompt_sources, cfg.split, cfg.heldout_fraction, cfg.max_prompts, cfg.prompts_file)
    stage.require(prompts=[p.id for p in prompts], model=model_source(cfg.model))
    if stage.complete:
        print(f"rollouts already complete: {out}")
        return out

    # load
    device = resolve_device(cfg.device, state.device)
    policy, tokenizer = load_sampler(cfg, device, state.num_processes)  # a HF model or a vLLM engine
    rewards = RewardSet.from_config(cfg.objectives, device, cfg.cache_dir, cfg.score_batch_size)
    stage.start()

    # run: each process generates and scores its share of chunks
    write_rollout_shards(prompts, policy, tokenizer, rewards, out / "shards", seed=cfg.seed,
                         chunk_size=cfg.chunk_size, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, system_prompt=cfg.system_prompt,
                         rank=state.process_index, world_size=state.num_processes)
    state.wait_for_everyone()

    # save + log (main process)
    if state.is_main_process:
        names = [s.name for s in parse_objectives(cfg.objectives)]
        summary = merge_rollouts(prompts, out / "shards", out, names, cfg.chunk_size, cfg.normalization)
    else:
        summary = {}
    stage.finish(summary)
    if state.is_main_process:
        run = start_run(cfg, "rollouts")
        if run is not None:
            run.summary.update({k: v for k, v in summary.items() if not isinstance(v, (str, list))})
            run.finish()
        print(f"rollouts: {summary['rows']} responses for {summary['prompts']} prompts, "
              f"{summary['tokens_per_second']:.0f} tokens/s")
        print(f"  dataset        {summary['dataset']}\n  normalisation  {summary['normalization']}")
    return out


if __name__ == "__main__":
    run_stage(main)
