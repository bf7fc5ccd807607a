"""Reward functions: the protocol, the registry of types, built-in offline scorers, HF reward models, RewardSet."""

from mocd_train.rewards import hf, text  # noqa: F401  (importing them registers the built-in reward types)
from mocd_train.rewards.base import (
    ObjectiveSpec,
    RewardFunction,
    build_reward,
    parse_objectives,
    register,
    reward_types,
)
from mocd_train.rewards.reward_set import Normalizer, RewardSet

__all__ = ["Normalizer", "ObjectiveSpec", "RewardFunction", "RewardSet",
           "build_reward", "parse_objectives", "register", "reward_types"]
