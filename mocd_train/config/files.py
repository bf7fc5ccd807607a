"""Recipes and the command line: YAML stage files and pipeline files, `--key value` overrides, the steps of a pipeline,
and `load_config`, which turns all of it into a stage's checked dataclass."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from mocd_train.config.schema import STAGES, CommonConfig, build_config
from mocd_train.config.types import describe, fields_of, unknown_key
from mocd_train.errors import ConfigError


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {str(path)!r} does not exist. Recipes live in recipes/<setup>/<stage>.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of keys, not {type(data).__name__}.")
    return data


def stage_values(data: dict[str, Any], stage: str, where: str) -> dict[str, Any]:
    """The flat keys of one stage from a stage file or a pipeline file (a section overrides shared keys)."""
    common = set(fields_of(CommonConfig))
    values, section = {}, {}
    for key, value in data.items():
        if key in STAGES and isinstance(value, dict):
            if key == stage:
                section = value
        elif key in common or key in fields_of(STAGES[stage]):  # `palette: hh-65` is a key of teach and policies
            values[key] = value
        elif key == "pipeline":  # the step list recipes/pipeline.py runs
            continue
        elif key in STAGES:
            raise ConfigError(f"{key}: the section for stage {key!r} in {where} must be a mapping.")
        else:
            known = sorted(common | set(STAGES) | set(fields_of(STAGES[stage])))
            raise unknown_key(key, known, where)
    return {**values, **section}


# "{best:<evaluation>:<param>}" in a pipeline step: a decoder parameter chosen by an earlier step (recipes/pipeline.py)
BEST = re.compile(r"^\{best:([\w.-]+):(\w+)\}$")


def pipeline_steps(data: dict[str, Any], path: str | Path) -> list[tuple[str, str, dict[str, Any]]]:
    """The `pipeline:` list of a pipeline file → [(stage, config file, step overrides)], each step checked: a step
    names its `stage`, optionally a stage file (`config`, relative to the repository or absolute), and key overrides."""
    steps = data.get("pipeline")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{path}: no `pipeline:` list of steps ({{stage: ..., key: value}}) to run.")
    out = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or step.get("stage") not in STAGES:
            raise ConfigError(f"pipeline[{i}] in {path}: each step needs `stage:` one of {', '.join(STAGES)}, got "
                              f"{step!r}.")
        config = str(step.get("config", path))
        extra = {k: v for k, v in step.items() if k not in ("stage", "config")}
        values = {**stage_values(read_yaml(config), step["stage"], config), **extra}
        values = {k: v for k, v in values.items() if not (isinstance(v, str) and BEST.match(v))}  # checked when run
        build_config(STAGES[step["stage"]], values, where=f"pipeline[{i}] ({step['stage']}, {config})")
        out.append((step["stage"], config, extra))
    return out


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """`--config F --key value --flag` → (F, {key: value}); values are parsed as YAML scalars/lists."""
    config, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: write overrides as --key value.")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw, i = argv[i + 1], i + 1
            else:
                raw = "true"
        i += 1
        if key == "config":
            config = raw
            continue
        try:
            overrides[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            overrides[key] = raw
    return config, overrides


def load_config(stage: str, argv: list[str] | None = None) -> Any:
    """Parse `--config recipe.yaml --key value ...` for `stage` into its dataclass."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(describe(STAGES[stage]))
        raise SystemExit(0)
    config, overrides = parse_overrides(argv)
    values = stage_values(read_yaml(config), stage, config) if config else {}
    values.update(overrides)
    return build_config(STAGES[stage], values, where=f"{stage} config ({config or 'command line'})")
