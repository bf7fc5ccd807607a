"""The one scaffold every stage runs in: open → skip if complete → check the saved settings → start (write the
resolved config, only once the inputs are known good) → resume → finish with DONE.json (docs/architecture.md,
"Reproducibility and resume")."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml
from filelock import FileLock, Timeout

from mocd_train.atomic import atomic_write_json, atomic_write_text
from mocd_train.config import config_diff, load_config, to_dict
from mocd_train.errors import ConfigError
from mocd_train.models import process_state
from mocd_train.rundir import DONE, is_complete, mark_complete, stage_dir

INPUTS = "inputs.json"
_HELD: dict[str, Any] = {}  # stage locks this process holds, by lock file


def fingerprint(source: Any) -> str:
    """What an input contained, as a short hash: a stage folder by its DONE.json (a re-made stage has a new one), a
    file by its bytes, any other folder (a checkpoint) by its files' names, sizes and modification times and its
    small JSON files' bytes (moving or `cp -a` keeps them; rewriting changes them), anything else (prompt ids, a hub
    id) by its JSON text."""
    h = hashlib.sha256()
    if isinstance(source, Path):
        if (source / DONE).is_file():
            h.update((source / DONE).read_bytes())
        elif source.is_file():
            h.update(source.read_bytes())
        elif source.is_dir():
            for f in sorted(p for p in source.rglob("*") if p.is_file()):
                st = f.stat()
                h.update(f"{f.relative_to(source)}:{st.st_size}:{st.st_mtime_ns}".encode())
                if f.name.endswith(".json") and f.stat().st_size < 1_000_000:
                    h.update(f.read_bytes())
        else:
            h.update(b"missing")
    else:
        h.update(json.dumps(source, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def run_status(run_dir: str | Path) -> list[dict]:
    """Every stage folder of a run (one with a saved config.yaml): complete, partial or stale — a complete stage
    is stale when an input it recorded by path (an upstream stage, a model or palette folder) has changed since."""
    run = Path(run_dir)
    out = []
    for saved in sorted(run.glob("*/config.yaml")) + sorted(run.glob("*/*/config.yaml")):
        folder = saved.parent
        changed = []
        if (folder / INPUTS).is_file():
            for name, entry in json.loads((folder / INPUTS).read_text()).items():
                if "path" in entry:
                    path = Path(entry["path"]) if Path(entry["path"]).is_absolute() else run / entry["path"]
                    if fingerprint(path) != entry["fingerprint"]:
                        changed.append(name)
        state = "stale" if changed else "complete" if is_complete(folder) else "partial"
        out.append({"stage": str(folder.relative_to(run)), "state": state, "changed": changed})
    return out


class Stage:
    """A stage's folder <run_dir>/<folder> and its lifecycle, for one process or all ranks of a data-parallel run
    (`state`: accelerate's process state; None for single-process stages)."""

    def __init__(self, cfg: Any, folder: str, state=None):
        self.cfg, self.state, self.folder = cfg, state, folder
        self.dir = stage_dir(cfg.run_dir, folder)
        self.is_main = state is None or state.is_main_process
        self.complete = is_complete(self.dir) and not cfg.overwrite
        self.inputs: dict[str, dict] = {}
        if self.is_main:
            self._lock()
        if not cfg.overwrite:
            self._check_saved()
        if self.complete:  # nothing will be written: another process may use it
            self._unlock()

    @classmethod
    def open(cls, kind: str, argv, folder: str | Callable[[Any], str], *, processes: bool = True):
        """(config, stage) for a stage kind ('teach', ...) from the command line; `folder` may depend on the config."""
        cfg = load_config(kind, argv)
        state = process_state(cfg.device) if processes else None
        return cfg, cls(cfg, folder(cfg) if callable(folder) else folder, state)

    def _lock(self) -> None:
        """One writer per stage: an OS file lock beside the folder, held until finish() or the process ends (a killed
        process leaves no stale lock). A second process on the same stage is refused at once; the same process
        opening the stage again (after an interrupted attempt) takes the lock over. Data-parallel ranks share the main
        rank's."""
        path = self._lock_path()
        if path in _HELD:
            _HELD.pop(path).release(force=True)
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise ConfigError(f"{self.dir} is being written by another process (lock {path}); wait for it to finish, "
                              "or give this run another name.") from None
        _HELD[path] = lock

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

    def require(self, **inputs: Any) -> None:
        """Record what this stage consumes — upstream stage folders, files, model folders (as Paths), prompt ids or
        names (as values) — and refuse to resume or re-use a stage made from other inputs: a partial one would mix
        two versions, a complete one is stale. Paths inside the run directory are stored relative to it, so a moved
        run stays valid."""
        run = Path(self.cfg.run_dir).resolve()
        for name, source in inputs.items():
            entry = {"fingerprint": fingerprint(source)}
            if isinstance(source, Path):
                resolved = source.resolve()
                entry["path"] = str(resolved.relative_to(run)) if resolved.is_relative_to(run) else str(resolved)
            self.inputs[name] = entry
        saved_path = self.dir / INPUTS
        if self.cfg.overwrite or not saved_path.is_file():
            return
        saved = json.loads(saved_path.read_text())
        changed = sorted(k for k, v in self.inputs.items()
                         if k in saved and saved[k]["fingerprint"] != v["fingerprint"])
        if changed:
            what = ", ".join(f"{k} ({self.inputs[k].get('path', 'its contents')})" for k in changed)
            state = "is stale" if self.complete else "cannot be resumed"
            raise ConfigError(f"{self.dir} {state}: {what} changed since it was started. Re-run it with --overwrite "
                              "true (or another name), or restore the input.")

    def start(self) -> Path:
        """Call once the inputs are validated: with `overwrite` the old output goes now, and the resolved config is
        saved (what a resumed or re-used stage is checked against). Every rank waits for the main one."""
        if self.is_main:
            if self.cfg.overwrite and self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            if self.inputs:
                atomic_write_json(self.dir / INPUTS, self.inputs)
        self.barrier()
        return self.dir

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def last_checkpoint(self, sub: str = "checkpoints") -> str | None:
        """The newest complete Trainer checkpoint under <stage>/<sub>, to resume from (None: start fresh). A Trainer
        writes trainer_state.json last, so a checkpoint without a readable one was cut short by a kill: it is moved
        aside (renamed .incomplete-…) with a warning, never resumed from, and the one before it is used."""
        path = self.dir / sub
        if not path.is_dir():
            return None
        found = sorted((p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                       key=lambda p: int(p.name.split("-")[-1]), reverse=True)
        for ckpt in found:
            try:
                json.loads((ckpt / "trainer_state.json").read_text())
                return str(ckpt)
            except (OSError, ValueError):
                aside = ckpt.with_name(f".incomplete-{ckpt.name}")
                shutil.rmtree(aside, ignore_errors=True)
                ckpt.rename(aside)
                warnings.warn(f"{ckpt} is incomplete (killed while saving?): moved to {aside.name}; resuming from "
                              "the checkpoint before it.", stacklevel=2)
        return None

    def finish(self, summary: dict) -> Path:
        """DONE.json (main process), written last: the stage is complete only now. Every rank waits for it."""
        if self.is_main:
            mark_complete(self.dir, summary)
            self._unlock()
        self.barrier()
        return self.dir

    def _lock_path(self) -> str:
        return str(self.dir.with_name(self.dir.name + ".lock"))

    def _unlock(self) -> None:
        lock = _HELD.pop(self._lock_path(), None)
        if lock is not None:
            lock.release(force=True)
