import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stage

import mocd_train.data as data
from mocd_train.config import ConfigError
from mocd_train.data import load_rollouts

ROOT = Path(__file__).parents[1]


def args(tiny_lm, run_dir, *extra):
    return ["--run_dir", str(run_dir), "--model", tiny_lm, "--objectives", "[non_toxicity, readability]",
            "--report_to", "none", "--max_prompts", "9", "--chunk_size", "2", "--num_samples", "3",
            "--max_new_tokens", "8", "--seed", "3", *extra]


def rows(run_dir):
    ds, _ = load_rollouts(run_dir)
    return sorted((r["prompt_id"], r["sample"], r["response"], tuple(r["response_ids"])) for r in ds)


def test_rollouts_dataset_and_stats(tiny_lm, tmp_path):
    out = stage("rollouts").main(args(tiny_lm, tmp_path))
    ds, norm = load_rollouts(tmp_path)
    assert len(ds) == 27 and len({(r["prompt_id"], r["sample"]) for r in ds}) == 27
    assert {"prompt", "response", "reward_non_toxicity", "reward_readability", "num_response_tokens",
            "finished", "source", "harmful"} <= set(ds.column_names)
    assert all(r["num_response_tokens"] <= 8 for r in ds)
    assert norm.objectives == ["non_toxicity", "readability"] and norm.count == 27
    mean = sum(r["reward_readability"] for r in ds) / len(ds)
    assert norm.mean[1] == pytest.approx(mean)
    summary = json.loads((out / "DONE.json").read_text())
    assert summary["rows"] == 27 and summary["tokens_per_second"] > 0


def test_interrupted_run_resumes_to_the_uninterrupted_result(tiny_lm, tmp_path, monkeypatch):
    rollouts = stage("rollouts")
    rollouts.main(args(tiny_lm, tmp_path / "whole"))

    real_write, calls = data.atomic_write_json, []

    def dies_on_third_chunk(path, obj):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-run, before the third chunk file exists
        real_write(path, obj)

    monkeypatch.setattr(data, "atomic_write_json", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        rollouts.main(args(tiny_lm, tmp_path / "cut"))
    monkeypatch.undo()
    shards = tmp_path / "cut" / "rollouts" / "shards"
    assert len(list(shards.glob("chunk-*.json"))) == 2 and not (tmp_path / "cut" / "rollouts" / "DONE.json").exists()
    (shards / ".chunk-00002.json.tmp-999").write_text("{half a fil")  # debris of a killed write is ignored
    with pytest.raises(FileNotFoundError, match="no complete rollouts"):
        load_rollouts(tmp_path / "cut")

    rollouts.main(args(tiny_lm, tmp_path / "cut"))
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_complete_stage_is_skipped_and_changed_settings_are_refused(tiny_lm, tmp_path, capsys):
    rollouts = stage("rollouts")
    rollouts.main(args(tiny_lm, tmp_path))
    stamp = (tmp_path / "rollouts" / "DONE.json").stat().st_mtime_ns
    rollouts.main(args(tiny_lm, tmp_path))
    assert "already complete" in capsys.readouterr().out
    assert (tmp_path / "rollouts" / "DONE.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="num_samples: 3 -> 2"):
        rollouts.main(args(tiny_lm, tmp_path, "--num_samples", "2"))


def test_rollouts_with_a_local_hf_reward_model(tiny_lm, tiny_rm, tmp_path):
    objectives = f"[{{name: helpful, type: hf_reward_model, model: {tiny_rm}, head: 1}}, positivity]"
    stage("rollouts").main(args(tiny_lm, tmp_path, "--objectives", objectives, "--max_prompts", "2"))
    ds, norm = load_rollouts(tmp_path)
    assert norm.objectives == ["helpful", "positivity"] and len(ds) == 6
    assert len({r["reward_helpful"] for r in ds}) > 1


@pytest.mark.slow
def test_two_process_accelerate_launch_matches_one_process(tiny_lm, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2",
           str(ROOT / "recipes" / "rollouts.py"), *args(tiny_lm, tmp_path / "two")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [json.loads(f.read_text()) for f in (tmp_path / "two" / "rollouts" / "shards").glob("chunk-*.json")]
    assert {(s["rank"], s["world_size"]) for s in shards} == {(0, 2), (1, 2)}  # two real ranks shared the work
    stage("rollouts").main(args(tiny_lm, tmp_path / "one"))
    assert rows(tmp_path / "two") == rows(tmp_path / "one")
