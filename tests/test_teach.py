import json

import pytest
import torch
from conftest import stage
from datasets import load_from_disk

import mocd_train.data as data
from mocd_train.config import ConfigError
from mocd_train.rewards import Normalizer
from mocd_train.tiny import synthetic_rollouts
from mocd_train.values import BackboneSpec, build_value_model

OBJECTIVES = ["readability", "positivity"]


@pytest.fixture
def run_dir(tiny_lm, tmp_path):
    """Synthetic rollouts and an (untrained, random-head) value model for the tiny policy."""
    from mocd_train.models import load_tokenizer

    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    torch.manual_seed(0)
    norm = Normalizer.load(tmp_path / "rollouts" / "normalization.json")
    model, tok = build_value_model(BackboneSpec(tiny_lm), OBJECTIVES, norm, load_tokenizer(tiny_lm), None)
    torch.nn.init.normal_(model.head.weight)
    model.save(tmp_path / "value" / "model", tok)
    return tmp_path


def teach_args(run_dir, lm, *extra):
    return ["--run_dir", str(run_dir), "--model", lm, "--objectives", f"[{', '.join(OBJECTIVES)}]",
            "--report_to", "none", "--max_prompts", "6", "--chunk_size", "2", "--batch_size", "2",
            "--num_candidates", "3", "--block_size", "4", "--max_new_tokens", "8", *extra]


def rows(out):
    return sorted((r["prompt_id"], r["response"], json.dumps(json.loads(r["trace"]), sort_keys=True))
                  for r in load_from_disk(str(out / "dataset")))


def test_rmod_teacher_dataset_and_resume_after_a_kill(run_dir, tiny_lm, monkeypatch, tmp_path_factory):
    teach = stage("teach")
    whole = teach.main(teach_args(run_dir, tiny_lm, "--decoder", "rmod", "--rmod_lambda", "5", "--name", "a"))
    ds = load_from_disk(str(whole / "dataset"))
    assert len(ds) == 6 and len(set(ds["prompt_id"])) == 6
    row = ds[0]
    assert json.loads(row["params"])["rmod_lambda"] == 5.0 and row["decoder"] == "rmod"
    trace = json.loads(row["trace"])
    assert trace and len(trace[0]["values"]) == 3 and len(trace[0]["weights"]) == 2 and trace[0]["gap"] <= 1e-6
    assert {"reward_readability", "reward_positivity", "cost_policy_tokens"} <= set(ds.column_names)

    real, calls = data.atomic_write_json, []

    def dies_on_second_chunk(path, obj):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(data, "atomic_write_json", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        teach.main(teach_args(run_dir, tiny_lm, "--decoder", "rmod", "--rmod_lambda", "5", "--name", "b"))
    monkeypatch.setattr(data, "atomic_write_json", real)
    resumed = teach.main(teach_args(run_dir, tiny_lm, "--decoder", "rmod", "--rmod_lambda", "5", "--name", "b"))
    assert rows(resumed) == rows(whole)  # every prompt once, the same tokens as without the kill


@pytest.mark.parametrize("decoder,extra", [("cd_uniform", []), ("cd_single", ["--objective", "positivity"]),
                                           ("cd_maximin", []), ("best_of_k", []), ("pi_ref", []),
                                           ("best_of_k", ["--score_with", "reward", "--name", "bok-reward"])])
def test_every_block_decoder_writes_a_teacher_dataset(run_dir, tiny_lm, decoder, extra):
    out = stage("teach").main(teach_args(run_dir, tiny_lm, "--decoder", decoder, *extra))
    ds = load_from_disk(str(out / "dataset"))
    assert len(ds) == 6 and set(ds["decoder"]) == {decoder}
    summary = json.loads((out / "DONE.json").read_text())
    assert summary["prompts"] == 6 and summary["policy_tokens"] > 0
    blocks = {len(json.loads(t)) for t in ds["trace"]}
    assert blocks == {1} if decoder in ("best_of_k", "pi_ref") else max(blocks) <= 2


def test_value_model_for_other_objectives_is_refused(run_dir, tiny_lm):
    from mocd_train.models import load_tokenizer

    model, tok = build_value_model(BackboneSpec(tiny_lm), ["helpfulness", "harmlessness"],
                                   Normalizer(["helpfulness", "harmlessness"], [0, 0], [1, 1]),
                                   load_tokenizer(tiny_lm), None)
    model.save(run_dir / "other_value", tok)
    with pytest.raises(ConfigError, match="helpfulness"):
        stage("teach").main(teach_args(run_dir, tiny_lm, "--value_model", str(run_dir / "other_value")))


def test_map_d_teacher_from_a_solved_palette(run_dir, tiny_lm):
    stage("palette").main(["--run_dir", str(run_dir), "--objectives", f"[{', '.join(OBJECTIVES)}]",
                                  "--report_to", "none", "--name", "p", "--targets", "{readability: '60%'}"])
    out = stage("teach").main(teach_args(run_dir, tiny_lm, "--decoder", "map_d", "--palette", "p"))
    ds = load_from_disk(str(out / "dataset"))
    assert len(ds) == 6 and len(json.loads(ds[0]["trace"])[0]["candidate_rewards"]) == 3


@pytest.mark.slow
def test_two_process_launch_decodes_every_prompt_once_as_one_process_does(run_dir, tiny_lm):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    args = teach_args(run_dir, tiny_lm, "--decoder", "rmod", "--name", "two")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2", str(root / "recipes" / "teach.py"),
           *args]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [json.loads(f.read_text()) for f in (run_dir / "teach" / "two" / "shards").glob("chunk-*.json")]
    assert {(s["rank"], s["world_size"]) for s in shards} == {(0, 2), (1, 2)}
    one = stage("teach").main(teach_args(run_dir, tiny_lm, "--decoder", "rmod", "--name", "one"))
    assert rows(run_dir / "teach" / "two") == rows(one)


def test_mod_and_soup_teachers_on_lora_policies(run_dir, tiny_lm):
    """MOD over two adapters (one batched model) and their soup decode through the same sampler: with w = e_1 both
    are policy 1, so greedy decodes agree; a mixed MOD differs from either."""
    from test_mod import random_adapter

    for i, name in enumerate(["a", "b"]):
        random_adapter(tiny_lm, run_dir / "policies" / name / "adapter", seed=i)
    common = ("--policies", "[a, b]", "--greedy", "true")
    mod = stage("teach").main(teach_args(run_dir, tiny_lm, "--decoder", "mod", "--name", "mod-a", "--mod_weights",
                                          "[1.0, 0.0]", *common))
    soup = stage("teach").main(teach_args(run_dir, tiny_lm, "--decoder", "soup", "--name", "soup-a", "--mod_weights",
                                           "[1.0, 0.0]", *common))
    mixed = stage("teach").main(teach_args(run_dir, tiny_lm, "--decoder", "mod", "--name", "mod-js", "--mod_weights",
                                            "[0.5, 0.5]", "--divergence", "js", *common))
    by = {k: {r["prompt_id"]: r["response_ids"] for r in load_from_disk(str(o / "dataset"))}
          for k, o in [("mod", mod), ("soup", soup), ("mixed", mixed)]}
    assert len(by["mod"]) == 6 and by["mod"] == by["soup"] and by["mixed"] != by["mod"]
    params = json.loads((mixed / "DONE.json").read_text())["params"]
    assert params["batched_adapters"] and params["rule"] == "js"


@pytest.mark.parametrize("extra,match", [
    (["--decoder", "mod"], "policies"),
    (["--decoder", "mod", "--policies", "[a, b]", "--mod_weights", "[1.0]"], "one weight per policy"),
    (["--decoder", "mod", "--policies", "[nope]", "--mod_weights", "[1.0]"], "nope"),
])
def test_mod_config_errors(run_dir, tiny_lm, extra, match):
    with pytest.raises(ConfigError, match=match):
        stage("teach").main(teach_args(run_dir, tiny_lm, *extra))
