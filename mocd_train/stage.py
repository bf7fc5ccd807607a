"""The one scaffold every stage runs in: open → skip if complete → check the saved settings → start (write the
resolved config, only once the inputs are known good) → resume → finish with DONE.json (docs/architecture.md,
"Reproducibility and resume")."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from mocd_train.atomic import atomic_write_text
from mocd_train.config import config_diff, load_config, to_dict
from mocd_train.errors import ConfigError
from mocd_train.models import process_state
from mocd_train.rundir import is_complete, mark_complete, stage_dir


class Stage:
    """A stage's folder <run_dir>/<folder> and its lifecycle, for one process or all ranks of a data-parallel run
    (`state`: accelerate's process state; None for single-process stages)."""

    def __init__(self, cfg: Any, folder: str, state=None):
        self.cfg, self.state, self.folder = cfg, state, folder
        self.dir = stage_dir(cfg.run_dir, folder)
        self.is_main = state is None or state.is_main_process
        self.complete = is_complete(self.dir) and not cfg.overwrite
        if not cfg.overwrite:
            self._check_saved()

    @classmethod
    def open(cls, kind: str, argv, folder: str | Callable[[Any], str], *, processes: bool = True):
        """(config, stage) for a stage kind ('teach', ...) from the command line; `folder` may depend on the config."""
        cfg = load_config(kind, argv)
        state = process_state(cfg.device) if processes else None
        return cfg, cls(cfg, folder(cfg) if callable(folder) else folder, state)

    def _check_saved(self) -> None:
        """A folder made with other output-relevant settings would mix incompatible results: refused, keys named."""
        saved_path = self.dir / "config.yaml"
        if not saved_path.is_file():
            return
        saved, current = yaml.safe_load(saved_path.read_text()) or {}, to_dict(self.cfg)
        diff = config_diff(saved, current)
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
            raise ConfigError(f"{self.dir} holds {self.folder} made with other settings ({detail}). Use another "
                              "run_dir or name, restore those settings, or pass --overwrite true to start it over.")

    def start(self) -> Path:
        """Call once the inputs are validated: with `overwrite` the old output goes now, and the resolved config is
        saved (what a resumed or re-used stage is checked against). Every rank waits for the main one."""
        if self.is_main:
            if self.cfg.overwrite and self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.barrier()
        return self.dir

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def last_checkpoint(self, sub: str = "checkpoints") -> str | None:
        """The newest complete Trainer checkpoint under <stage>/<sub>, to resume from (None: start fresh)."""
        from transformers.trainer_utils import get_last_checkpoint  # heavy

        path = self.dir / sub
        return get_last_checkpoint(str(path)) if path.is_dir() else None

    def finish(self, summary: dict) -> Path:
        """DONE.json (main process), written last: the stage is complete only now. Every rank waits for it."""
        if self.is_main:
            mark_complete(self.dir, summary)
        self.barrier()
        return self.dir
