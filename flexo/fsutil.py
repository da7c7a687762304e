"""Small file-system helpers: atomic outputs, hashes, JSON.

Every stage writes its outputs through :func:`atomic_dir` or :func:`atomic_file`, so a crash or a
SIGKILL half way never leaves something that DVC or a later stage could mistake for a finished output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tmp_sibling(path: Path) -> Path:
    # A hidden sibling on the same file system, so the final rename is atomic.
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``path`` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = _tmp_sibling(path)
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        remove_path(old)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path for a writer that wants a file name; it becomes ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file for writing; it becomes ``path`` only when the block ends without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: Path, what: str = "file") -> Any:
    """Read JSON written by flexo; a missing or broken file is a one-line FlexoError."""
    from flexo.errors import FlexoError

    path = Path(path)
    if not path.is_file():
        raise FlexoError(f"{what} {path} does not exist: run the stage that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FlexoError(f"{what} {path} is not valid JSON ({e}): rerun the stage that writes it") from None


def clean_stale_temps(folder: Path) -> None:
    """Remove temp outputs left by a killed run (``.NAME.tmp-*``)."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            remove_path(p)
