"""Writing files and folders so that a kill at any instant never leaves a partial one that looks finished: everything
is written under a temporary name unique to this process and call, then renamed into place. A leaf module (stdlib
only), used by every saver in the package."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block succeeds it becomes `final`, and only then is an
    existing `final` moved aside and removed. A kill at any instant leaves at `final` either the old folder or the
    new one, or (between the two renames) nothing — never a partial one. On an error the temporary folder is deleted
    and `final` is untouched. Concurrent writers each land whole; the last one wins."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final)
    tmp.mkdir()
    old: list[Path] = []
    try:
        yield tmp
        while True:
            try:
                os.replace(tmp, final)  # fails while a (non-empty) final is in the way
                break
            except OSError:
                aside = _temporary(final)
                try:
                    os.replace(final, aside)
                    old.append(aside)
                except FileNotFoundError:  # another writer moved it first
                    pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for aside in old:
            shutil.rmtree(aside, ignore_errors=True)
