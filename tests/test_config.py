import dataclasses
from pathlib import Path

import pytest
import yaml

from mocd_train.cli import main as mocd
from mocd_train.config import STAGES, ConfigError, RolloutsConfig, load_config
from mocd_train.stage import Stage

RECIPES = Path(__file__).parents[1] / "recipes"


def write(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_stage_file_and_overrides(tmp_path):
    path = write(tmp_path, {"run_dir": "runs/x", "num_samples": 2, "objectives": ["positivity"]})
    cfg = load_config("rollouts", ["--config", path, "--num_samples", "8", "--temperature=0.7",
                                   "--objectives", "[positivity, readability]", "--overwrite"])
    assert isinstance(cfg, RolloutsConfig)
    assert (cfg.num_samples, cfg.temperature, cfg.overwrite) == (8, 0.7, True)
    assert cfg.objectives == ["positivity", "readability"]
    assert cfg.run_dir == "runs/x" and cfg.max_new_tokens == RolloutsConfig.max_new_tokens


def test_pipeline_section_overrides_shared_keys_in_any_order(tmp_path):
    path = write(tmp_path, {"rollouts": {"seed": 7, "num_samples": 3}, "seed": 1, "objectives": ["positivity"]})
    cfg = load_config("rollouts", ["--config", path])
    assert (cfg.seed, cfg.num_samples, cfg.objectives) == (7, 3, ["positivity"])


@pytest.mark.parametrize("data, argv, message", [
    ({"num_sample": 4}, [], "unknown key 'num_sample'.*Did you mean 'num_samples'"),
    ({"rolouts": {"num_samples": 4}}, [], "unknown key 'rolouts'.*'rollouts'"),
    ({}, ["--temperature", "hot"], "temperature: expected a number, got 'hot'"),
    ({}, ["--num_samples", "2.5"], "num_samples: expected an integer"),
    ({}, ["--split", "test"], "split: 'test' is not one of 'train' \\| 'heldout'"),
    ({"objectives": ["helpfullness"]}, [],
     "unknown objective 'helpfullness'. Did you mean 'helpfulness'.*Known: .*relevance"),
    ({"objectives": "relevance"}, [], "objectives: expected a list"),
    ({"objectives": [{"name": "h", "type": "hf_reward_model"}]}, [], "needs \\['model'\\]"),
    ({"objectives": [{"type": "relevance", "modle": "x"}]}, [], "has no option 'modle'"),
    ({"objectives": ["relevance", "relevance"]}, [], "duplicate names"),
    ({"prompts_file": "nowhere.jsonl"}, [], "prompts_file: 'nowhere.jsonl' does not exist"),
    ({"prompt_sources": ["reddit"]}, [], "unknown key 'reddit' in prompt_sources"),
    ({"num_samples": 0}, [], "num_samples: must be a positive integer"),
    ({"heldout_fraction": 1.5}, [], "heldout_fraction"),
    ({"rollouts": [1, 2]}, [], "section for stage 'rollouts'.*must be a mapping"),
    ({}, ["--temperature", "inf"], "temperature: must be a finite number, got 'inf'"),
    ({"temperature": float("nan")}, [], "temperature: must be a finite number"),
])
def test_errors_name_the_key_and_the_fix(tmp_path, data, argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config("rollouts", ["--config", write(tmp_path, data), *argv])


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("rollouts", ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("rollouts", ["--config", str(bad)])


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_field_has_help(stage):
    for f in dataclasses.fields(STAGES[stage]):
        assert f.metadata.get("help"), f"{stage}.{f.name}"


def test_resolved_config_saved_and_resume_checks_it(tmp_path):
    cfg = load_config("rollouts", ["--run_dir", str(tmp_path), "--objectives", "[positivity]"])
    stage = Stage(cfg, "rollouts")
    assert not (tmp_path / "rollouts").exists()  # nothing is written before start()
    out = stage.start()
    assert yaml.safe_load((out / "config.yaml").read_text())["objectives"] == ["positivity"]
    Stage(dataclasses.replace(cfg, report_to="none", score_batch_size=3), "rollouts")  # output-neutral keys differ
    with pytest.raises(ConfigError, match="temperature: 1.0 -> 0.5.*--overwrite"):
        Stage(dataclasses.replace(cfg, temperature=0.5), "rollouts")
    (out / "keep.txt").write_text("old")
    redo = Stage(dataclasses.replace(cfg, temperature=0.5, overwrite=True), "rollouts")
    assert (out / "keep.txt").exists()  # overwrite removes the old output only when the new run starts
    redo.start()
    assert not (out / "keep.txt").exists()


def test_all_shipped_recipes_validate(capsys):
    recipes = sorted(str(p) for p in RECIPES.rglob("*.yaml"))
    assert recipes
    mocd(["validate", *recipes])
    assert capsys.readouterr().out.count("valid") == len(recipes)


def test_cli_error_exit(tmp_path, capsys):
    path = write(tmp_path, {"bogus": 1})
    with pytest.raises(SystemExit) as e:
        mocd(["validate", path])
    assert e.value.code == 2 and "unknown key 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--rmod_lambda", "nan"], "rmod_lambda: must be a finite number"),
    (["--decoder", "cd_fixed", "--cd_weights", "[0.5, .nan]"], r"cd_weights\[1\]: must be a finite number"),
    (["--alpha", "-inf"], "alpha: must be a finite number"),
])
def test_teach_refuses_non_finite_numbers(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config("teach", ["--config", write(tmp_path, {}), *argv])
