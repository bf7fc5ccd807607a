"""The reward-function protocol, the registry of reward types, and objective specs from configs."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from mocd_train.errors import ConfigError


@runtime_checkable
class RewardFunction(Protocol):
    """One objective: higher is better. Scores a batch of (prompt, response) pairs."""

    name: str

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:  # [N] float
        ...


REGISTRY: dict[str, Callable[..., RewardFunction]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(type_name: str, description: str):
    """Register a reward factory (a class or function taking `name`, `device` and its own options)."""

    def wrap(factory):
        REGISTRY[type_name] = factory
        DESCRIPTIONS[type_name] = description
        return factory

    return wrap


@dataclass
class ObjectiveSpec:
    name: str
    type: str
    options: dict[str, Any] = field(default_factory=dict)


def reward_types() -> dict[str, str]:
    """Every registered reward type with its one-line description (the package `mocd_train.rewards` registers the
    built-in ones when it is imported)."""
    return dict(sorted(DESCRIPTIONS.items()))


def parse_objectives(items: list) -> list[ObjectiveSpec]:
    """Config entries (names or mappings) → specs; unknown types or options are a ConfigError."""
    registry = REGISTRY
    if not items:
        raise ConfigError("objectives: empty. Name at least one, e.g. [relevance, harmlessness].")
    specs = []
    for i, item in enumerate(items):
        key = f"objectives[{i}]"
        if isinstance(item, str):
            item = {"name": item, "type": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{key}: expected a name or a mapping {{name, type, ...}}, got {item!r}.")
        item = dict(item)
        type_name = item.pop("type", None) or item.get("name")
        name = item.pop("name", None) or type_name
        if type_name not in registry:
            close = difflib.get_close_matches(str(type_name), list(registry), n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{key}: unknown objective {type_name!r}. {hint}Known: {', '.join(sorted(registry))}.")
        params = inspect.signature(registry[type_name]).parameters
        for opt in item:
            if opt not in params or opt in ("name", "device"):
                allowed = [p for p in params if p not in ("name", "device")]
                raise ConfigError(f"{key}: objective type {type_name!r} has no option {opt!r}. Options: {allowed}.")
        missing = [p.name for p in params.values()
                   if p.default is inspect.Parameter.empty and p.name not in ("name", "device") and p.name not in item]
        if missing:
            raise ConfigError(f"{key}: objective type {type_name!r} needs {missing}.")
        specs.append(ObjectiveSpec(str(name), type_name, item))
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"objectives: duplicate names {sorted(dup)}; give each a distinct `name`.")
    return specs


def build_reward(spec: ObjectiveSpec, device: str | torch.device = "cpu",
                 cache_dir: str | None = None) -> RewardFunction:
    factory = REGISTRY[spec.type]
    kwargs = dict(spec.options)
    params = inspect.signature(factory).parameters
    if "cache_dir" in params and "cache_dir" not in kwargs:
        kwargs["cache_dir"] = cache_dir
    return factory(name=spec.name, device=device, **kwargs)
