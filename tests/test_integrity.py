"""A run directory is never silently wrong: inputs that change under a resumed or re-used stage are refused by name,
a checkpoint cut short by a kill is never resumed from, one process writes a stage, a moved run stays valid."""

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import stage

import mocd_train.data as data
from mocd_train.errors import ConfigError
from mocd_train.rewards import Normalizer
from mocd_train.tiny import synthetic_rollouts
from mocd_train.values import BackboneSpec, build_value_model

OBJECTIVES = ["readability", "positivity"]


def teach_args(run_dir, lm, *extra):
    return ["--run_dir", str(run_dir), "--model", lm, "--objectives", f"[{', '.join(OBJECTIVES)}]",
            "--report_to", "none", "--max_prompts", "6", "--chunk_size", "2", "--batch_size", "2",
            "--num_candidates", "3", "--block_size", "4", "--max_new_tokens", "8", *extra]


def value_model(run_dir, lm, seed):
    from mocd_train.models import load_tokenizer

    torch.manual_seed(seed)
    norm = Normalizer.load(run_dir / "rollouts" / "normalization.json")
    model, tok = build_value_model(BackboneSpec(lm), OBJECTIVES, norm, load_tokenizer(lm), None)
    torch.nn.init.normal_(model.head.weight)
    model.save(run_dir / "value" / "model", tok)


def interrupted(monkeypatch, main, args, after=1):
    """Run a chunked stage that is killed right after its first `after` chunks are written."""
    real, calls = data.atomic_write_json, []

    def dies(path, obj):
        calls.append(path)
        if len(calls) > after:
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(data, "atomic_write_json", dies)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(data, "atomic_write_json", real)


def test_a_retrained_value_model_under_a_resumed_teacher_is_refused_and_a_complete_one_is_stale(
        tiny_lm, tmp_path, monkeypatch):
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    value_model(tmp_path, tiny_lm, seed=0)
    teach = stage("teach")
    args = teach_args(tmp_path, tiny_lm, "--decoder", "cd_uniform", "--name", "t")
    interrupted(monkeypatch, teach.main, args)
    value_model(tmp_path, tiny_lm, seed=1)  # retrained while the teacher was half done
    with pytest.raises(ConfigError, match=r"cannot be resumed: value \(value\) changed"):
        teach.main(args)
    done = teach.main(args + ["--overwrite", "true"])
    assert len(json.loads((done / "inputs.json").read_text())) == 4  # prompts, rollouts, model, value
    from mocd_train.stage import run_status

    assert {r["stage"]: r["state"] for r in run_status(tmp_path)}["teach/t"] == "complete"
    value_model(tmp_path, tiny_lm, seed=2)
    with pytest.raises(ConfigError, match="is stale: value"):
        teach.main(args)
    status = {r["stage"]: r for r in run_status(tmp_path)}
    assert status["teach/t"]["state"] == "stale" and status["teach/t"]["changed"] == ["value"]
    assert status["rollouts"]["state"] == "complete"


def test_an_edited_prompts_file_under_resumed_rollouts_is_refused(tiny_lm, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"question number {i}?" for i in range(6)))
    args = ["--run_dir", str(tmp_path / "run"), "--model", tiny_lm, "--objectives", "[readability]",
            "--report_to", "none", "--prompts_file", str(prompts), "--chunk_size", "2", "--num_samples", "2",
            "--max_new_tokens", "4"]
    rollouts = stage("rollouts")
    interrupted(monkeypatch, rollouts.main, args)
    prompts.write_text("\n".join(f"question number {i}?" for i in [0, 1, 9, 3, 4, 5]))
    with pytest.raises(ConfigError, match="cannot be resumed: prompts"):
        rollouts.main(args)
    # a chunk made for other prompts is caught by itself too, naming its file
    (tmp_path / "run" / "rollouts" / "inputs.json").unlink()
    with pytest.raises(ConfigError, match=r"chunk-00000.json was made for other prompts"):
        rollouts.main(args)


def test_a_resolved_palette_under_a_half_done_map_d_teacher_is_refused(tiny_lm, tmp_path, monkeypatch):
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    palette = ["--run_dir", str(tmp_path), "--objectives", f"[{', '.join(OBJECTIVES)}]", "--report_to", "none",
               "--name", "p"]
    stage("palette").main(palette + ["--targets", "{readability: '60%'}"])
    teach = stage("teach")
    args = teach_args(tmp_path, tiny_lm, "--decoder", "map_d", "--palette", "p")
    interrupted(monkeypatch, teach.main, args)
    stage("palette").main(palette + ["--targets", "{readability: '70%'}", "--overwrite", "true"])
    with pytest.raises(ConfigError, match=r"cannot be resumed: palette \(palette/p\) changed"):
        teach.main(args)


def test_a_checkpoint_cut_short_is_moved_aside_and_the_one_before_is_resumed(tmp_path):
    from mocd_train.config import load_config
    from mocd_train.stage import Stage

    cfg = load_config("value", ["--run_dir", str(tmp_path), "--objectives", "[readability]"])
    st = Stage(cfg, "value")
    ckpts = tmp_path / "value" / "checkpoints"
    for step in (5, 10):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        (ckpts / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x")
        (ckpts / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ckpts / "checkpoint-15").mkdir()
    (ckpts / "checkpoint-15" / "model.safetensors").write_bytes(b"half")  # killed before trainer_state.json
    with pytest.warns(UserWarning, match="checkpoint-15 is incomplete"):
        assert st.last_checkpoint().endswith("checkpoint-10")
    assert (ckpts / ".incomplete-checkpoint-15").is_dir() and not (ckpts / "checkpoint-15").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert st.last_checkpoint().endswith("checkpoint-10")  # nothing left to warn about


def test_a_second_process_on_a_stage_is_refused_while_the_first_holds_it(tiny_lm, tmp_path):
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    lock = tmp_path / "teach" / "t.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"l = FileLock({str(lock)!r}); l.acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="being written by another process"):
            stage("teach").main(teach_args(tmp_path, tiny_lm, "--decoder", "pi_ref", "--name", "t"))
    finally:
        holder.kill()
        holder.wait()
    out = stage("teach").main(teach_args(tmp_path, tiny_lm, "--decoder", "pi_ref", "--name", "t"))  # free again
    assert (out / "DONE.json").is_file()


def test_a_moved_run_directory_stays_valid(tiny_lm, tmp_path, capsys):
    synthetic_rollouts(tmp_path / "a", tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    stage("teach").main(teach_args(tmp_path / "a", tiny_lm, "--decoder", "pi_ref", "--name", "t"))
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy2)
    capsys.readouterr()
    stage("teach").main(teach_args(tmp_path / "b", tiny_lm, "--decoder", "pi_ref", "--name", "t"))
    assert "already complete" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [(["--max_prompts", "0"], "max_prompts: must be a positive integer"),
                                          (["--max_prompts", "-1"], "max_prompts: must be a positive integer"),
                                          (["--temperature", "inf"], "temperature: must be a finite number"),
                                          (["--rmod_lambda", "nan"], "rmod_lambda: must be a finite number")])
def test_nonsense_numbers_are_refused(tmp_path, argv, message):
    from mocd_train.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config("teach", ["--run_dir", str(tmp_path), *argv])


def test_a_damaged_chunk_is_named_with_the_fix_and_is_regenerated_once_deleted(tiny_lm, tmp_path, monkeypatch):
    args = ["--run_dir", str(tmp_path), "--model", tiny_lm, "--objectives", "[readability]", "--report_to", "none",
            "--max_prompts", "6", "--chunk_size", "2", "--num_samples", "2", "--max_new_tokens", "4"]
    rollouts = stage("rollouts")
    interrupted(monkeypatch, rollouts.main, args, after=2)
    chunk = next((tmp_path / "rollouts").rglob("chunk-00001.json"))
    chunk.write_text(chunk.read_text()[: len(chunk.read_text()) // 2])  # cut short, e.g. by a full disk
    for _ in range(2):  # the same sentence on every rerun, until the file is gone
        with pytest.raises(ConfigError, match=r"chunk-00001.json is damaged .* delete it and re-run"):
            rollouts.main(args)
    chunk.unlink()
    rollouts.main(args)
    ds, _ = data.load_rollouts(tmp_path)
    assert len(ds) == 12 and len(set(ds["prompt_id"])) == 6


def test_a_failed_start_leaves_nothing_that_refuses_the_corrected_command(tiny_lm, tmp_path):
    synthetic_rollouts(tmp_path, tiny_lm, tuple(OBJECTIVES), num_prompts=8)
    teach = stage("teach")
    with pytest.raises(ConfigError, match="no-such-model"):
        teach.main(teach_args(tmp_path, str(tmp_path / "no-such-model"), "--decoder", "pi_ref", "--name", "t"))
    out = teach.main(teach_args(tmp_path, tiny_lm, "--decoder", "pi_ref", "--name", "t"))
    assert (out / "DONE.json").is_file()
