"""Stage configs: one dataclass per stage, read from a YAML recipe plus `--key value` overrides.

A recipe is either a stage file (flat keys) or a pipeline file: shared keys at the top level and one section per
stage (`rollouts:`, ...). A stage reads the shared keys plus its own section. Every mistake (unknown key, wrong type,
unknown objective, missing file) raises one `ConfigError` that names the key and the fix. By job: `types` checks
values against annotations, `schema` holds the dataclasses and their checks, `files` reads recipes and the command
line.
"""

from mocd_train.config.files import BEST, load_config, parse_overrides, pipeline_steps, read_yaml, stage_values
from mocd_train.config.schema import (
    DIVERGENCES,
    F_DIVERGENCE_LOSSES,
    RESUME_FREE_KEYS,
    STAGES,
    CommonConfig,
    DistillConfig,
    EvaluateConfig,
    PaletteConfig,
    PolicyConfig,
    RolloutsConfig,
    TeachConfig,
    TrainingConfig,
    ValueConfig,
    build_config,
    config_diff,
    validate,
)
from mocd_train.config.types import describe, doc, to_dict
from mocd_train.errors import ConfigError

__all__ = ["BEST", "DIVERGENCES", "F_DIVERGENCE_LOSSES", "RESUME_FREE_KEYS", "STAGES", "CommonConfig", "ConfigError",
           "DistillConfig", "EvaluateConfig", "PaletteConfig", "PolicyConfig", "RolloutsConfig", "TeachConfig",
           "TrainingConfig", "ValueConfig", "build_config", "config_diff", "describe", "doc", "load_config",
           "parse_overrides", "pipeline_steps", "read_yaml", "stage_values", "to_dict", "validate"]
