"""Every shipped recipe stays valid: each stage it holds parses, every objective option is legal, every file and
accelerate config it names exists, and a palette a policy names is one its setup's pipeline solves."""

import inspect
import re
import typing
from pathlib import Path

import pytest
import yaml

from mocd_train.config import STAGES, build_config, pipeline_steps, stage_values
from mocd_train.rewards.base import REGISTRY, parse_objectives

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def stages_of(data: dict, path: Path) -> list[str]:
    named = [s for s in STAGES if isinstance(data.get(s), dict)]
    if named:
        return named
    return [s for s in STAGES if _builds(data, s, path)]


def _builds(data, stage, path) -> bool:
    try:
        build_config(STAGES[stage], stage_values(data, stage, str(path)))
        return True
    except Exception:
        return False


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_is_valid_and_resolves_what_it_names(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their files relative to the repository, as users run them
    text = path.read_text()
    data = yaml.safe_load(text)
    if "pipeline" in data:  # every step builds its stage's config, stage files included
        assert pipeline_steps(data, str(path.relative_to(ROOT)))
    stages = stages_of(data, path)
    assert stages, f"{path} is valid for no stage"
    for stage in stages:
        cfg = build_config(STAGES[stage], stage_values(data, stage, str(path)))
        for spec in parse_objectives(cfg.objectives):
            factory = REGISTRY[spec.type]
            hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
            for opt, value in spec.options.items():
                allowed = typing.get_args(hints.get(opt)) if typing.get_origin(hints.get(opt)) is typing.Literal else ()
                assert not allowed or value in allowed, f"{spec.name}.{opt}: {value!r} not in {allowed}"
        prompts_file = getattr(cfg, "prompts_file", None)
        if prompts_file and not prompts_file.startswith("hf:"):
            assert (ROOT / prompts_file).is_file(), prompts_file
        palette = getattr(cfg, "palette", None)
        if stage == "policies" and palette and not palette.endswith(".json"):
            pipeline = yaml.safe_load((path.parent.parent / "pipeline.yaml").read_text())
            assert pipeline["palette"]["name"] == palette, f"{path} trains for palette {palette!r} nobody solves"
    for named in re.findall(r"accelerate_configs/[\w.-]+\.yaml|recipes/[\w./-]+\.(?:yaml|py)", text):
        assert (ROOT / named).is_file(), f"{path} names {named}, which does not exist"


def test_every_setup_ships_the_stages_its_readme_promises():
    default = ROOT / "recipes" / "smollm2-mini-hh" / "policies"
    for objective in ("helpfulness", "harmlessness"):
        for kind in ("dpo", "dpo-js", "grpo"):
            assert (default / f"{objective}-{kind}.yaml").is_file()
    assert list(default.glob("*-ppo.yaml")) and list(default.glob("map-f-*.yaml"))
