"""The run directory: one folder per stage, atomic writes, completion markers, the resolved config per stage.

A stage's output is complete only when its `DONE.json` exists; it is written last, after everything it vouches for.
Partial files are always written under a temporary name and renamed, so a kill never leaves a half file behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mocd_train.atomic import atomic_dir, atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)
from mocd_train.errors import ConfigError

DONE = "DONE.json"


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage


def teacher_dataset(run_dir: str | Path, name: str) -> Path:
    """A teacher's (prompt, response) dataset: teach/<name>/dataset of the run, or a dataset folder given as a path."""
    path = stage_dir(run_dir, "teach") / name / "dataset"
    path = path if path.is_dir() else Path(name)
    if not path.is_dir():
        raise ConfigError(f"teacher {name!r}: no dataset at {stage_dir(run_dir, 'teach') / name / 'dataset'} and not a "
                          "dataset folder; decode it first with recipes/teach.py.")
    return path


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / DONE).is_file()


def mark_complete(directory: str | Path, summary: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / DONE, summary)
