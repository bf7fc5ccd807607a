import os

# Tests never touch the network: hub ids fail at once instead of after a timeout.
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
    os.environ[key] = value

import importlib  # noqa: E402

import pytest  # noqa: E402


def stage(name: str):
    """A stage's entry point, mocd_train.stages.<name> (what recipes/<script>.py runs)."""
    return importlib.import_module(f"mocd_train.stages.{name}")


def killed_at(step):
    """A trainer callback that interrupts training after `step`, as a crash or Ctrl-C would."""
    from transformers import TrainerCallback

    class Killed(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise KeyboardInterrupt

    return Killed()


@pytest.fixture(scope="session", autouse=True)
def asset_cache(tmp_path_factory):
    """One cache for the whole session (converted checkpoints, fitted probes), never the user's."""
    path = os.environ.get("MOCD_TEST_CACHE") or str(tmp_path_factory.mktemp("mocd_cache"))
    os.environ["MOCD_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    from mocd_train.tiny import tiny_llama

    return str(tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory):
    from mocd_train.tiny import tiny_gpt2_reward_model

    return str(tiny_gpt2_reward_model(tmp_path_factory.mktemp("tiny_rm"), num_labels=3))


@pytest.fixture(scope="session")
def tiny_gpt2_lm(tmp_path_factory):
    from mocd_train.tiny import tiny_gpt2_lm

    return str(tiny_gpt2_lm(tmp_path_factory.mktemp("tiny_gpt2")))
