from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = sorted((Path(__file__).parents[1] / "accelerate_configs").glob("*.yaml"))


def test_all_six_configs_exist():
    assert {p.stem for p in CONFIGS} == {"cpu", "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_says_when_to_use_it(path):
    config = load_config_from_file(str(path))
    assert config.distributed_type is not None
    assert path.read_text().startswith("#")
