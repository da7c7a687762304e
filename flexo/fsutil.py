"""Small file-system helpers: guarded atomic outputs, hashes, JSON.

Every stage writes its outputs through :func:`atomic_dir`, :func:`atomic_path` or :func:`atomic_file`,
so a crash or a SIGKILL half way never leaves something that DVC or a later stage could mistake for a
finished output. Three promises on top of atomicity:

- **Never destroy.** An :class:`OutputGuard` says what a stage may replace: a path that is absent, an
  empty folder, or an earlier output of the same kind (its manifest says so). Never one of the stage's
  own inputs, a folder that contains them, or a project folder the stage does not own (owners' data,
  the public model, the packages, ``.git``, ``.dvc``). Anything else is refused with one line and left
  untouched, before any work is done and again just before the rename.
- **No litter.** A killed run leaves its temp sibling ``.NAME.tmp-PID-…``; the next write of the same
  path removes every such sibling whose process is gone.
- **No races.** Two processes that finish the same output at the same moment take turns: the final
  swap (old out of the way, new in, old removed) holds an exclusive lock on the parent folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from flexo.errors import FlexoError

# errno values that mean "the disk (or this process's file-size limit) is full".
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ guards
def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class OutputGuard:
    """What a stage may replace at its output path.

    `kind` names the output in messages ("merged model"); `same_kind(path)` says whether an existing
    path is an earlier output of that kind; `inputs` are the stage's inputs (the output may be none of
    them, nor contain one, nor lie inside one); `protected` are project folders the output must not be
    or lie inside (a user-given `--out` gets the project's data and artifact folders here); `files` are
    the (glob) names an earlier output of this kind holds — a folder holding anything else (a user's own
    notes, an adapter) is refused rather than replaced; `command` is what the user ran and `user_out`
    whether the path came from `--out`, for the message."""

    kind: str
    same_kind: Callable[[Path], bool]
    inputs: tuple[Path, ...] = ()
    protected: tuple[Path, ...] = ()
    command: str = "flexo"
    files: tuple[str, ...] | None = None
    user_out: bool = False

    def check(self, path: Path) -> None:
        path = Path(path)
        target = path.resolve()
        fix = (f"choose another --out (an absent folder, or one an earlier `{self.command}` wrote)" if self.user_out
               else f"move it out of the way and rerun `{self.command}`")
        if target == Path(target.anchor) or target == Path.home().resolve():
            raise FlexoError(f"refusing to write the {self.kind} to {path}: it is a top-level folder; {fix}")
        for inp in self.inputs:
            inp = Path(inp).resolve()
            if _inside(inp, target) or _inside(target, inp):
                rel = "is" if target == inp else ("contains" if _inside(inp, target) else "lies inside")
                raise FlexoError(f"refusing to write the {self.kind} to {path}: it {rel} this command's input "
                                 f"{inp}; {fix}")
        for folder in self.protected:
            folder = Path(folder).resolve()
            if _inside(target, folder) or _inside(folder, target):
                raise FlexoError(f"refusing to write the {self.kind} to {path}: {folder} belongs to the project "
                                 f"(owners' data or another stage's output) and is never overwritten; {fix}")
        if path.is_symlink():
            raise FlexoError(f"refusing to write the {self.kind} to {path}: it is a symbolic link; {fix}")
        if not path.exists():
            return
        if path.is_dir() and not any(path.iterdir()):
            return
        if not self.same_kind(path):
            what = "a file" if path.is_file() else "a folder"
            raise FlexoError(f"refusing to write the {self.kind} to {path}: it is {what} that is not an earlier "
                             f"{self.kind}, and flexo never deletes what it did not write; {fix}")
        if self.files is not None:
            foreign = next((rel for rel in _files_below(path) if not any(fnmatch.fnmatch(rel, g) for g in self.files)),
                           None)
            if foreign is not None:
                raise FlexoError(f"refusing to write the {self.kind} to {path}: besides an earlier {self.kind} it "
                                 f"holds {foreign}, which flexo did not write and never deletes; {fix}")


def _files_below(folder: Path) -> Iterator[str]:
    """Every file and link under `folder`, as a relative POSIX path (links are not followed)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(filenames) + sorted(d for d in dirnames if (Path(dirpath) / d).is_symlink()):
            yield (Path(dirpath) / name).relative_to(folder).as_posix()


# --------------------------------------------------------------------------------- temp siblings
_TMP = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}$")


def _tmp_sibling(path: Path) -> Path:
    # A hidden sibling on the same file system, so the final rename is atomic; the pid lets a later run
    # tell a dead writer's leftovers from a live one's work in progress.
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(path: Path) -> list[Path]:
    """Remove the temp siblings of `path` (``.NAME.tmp-PID-…``) whose writing process is gone."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = f".{path.name}.tmp-"
    for p in path.parent.iterdir():
        m = _TMP.search(p.name)
        if p.name.startswith(prefix) and m and not _alive(int(m.group(1))):
            remove_path(p)
            removed.append(p)
    return removed


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def _swap_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` (the output's parent) for the few renames that replace an output."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _begin(path: Path, guard: OutputGuard | None) -> None:
    if guard is not None:
        guard.check(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)


@contextlib.contextmanager
def atomic_dir(path: Path, guard: OutputGuard | None = None) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``path`` in one rename, on error it is removed.

    With a `guard`, ``path`` is checked before the temp folder is made and again before the swap."""
    path = Path(os.path.abspath(path))  # "." or "x/.." have no name to build a sibling from
    _begin(path, guard)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        with _swap_lock(path.parent):
            if guard is not None:
                guard.check(path)
            old = None
            if path.exists() or path.is_symlink():
                old = _tmp_sibling(path)
                path.rename(old)
            tmp.rename(path)
        if old is not None:
            remove_path(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_no_space(e, path)
        raise


@contextlib.contextmanager
def atomic_path(path: Path, guard: OutputGuard | None = None) -> Iterator[Path]:
    """Yield a temp path for a writer that wants a file name; it becomes ``path`` only on success."""
    path = Path(os.path.abspath(path))
    _begin(path, guard)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        with _swap_lock(path.parent):
            if guard is not None:
                guard.check(path)
            tmp.replace(path)
    except BaseException as e:
        _raise_no_space(e, path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _raise_no_space(e: BaseException, path: Path) -> None:
    """A full disk while writing `path` is the user's to fix: one line naming it (the temp is gone)."""
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        raise FlexoError(f"no space left while writing {path} ({e.strerror}): free space on its disk (or raise "
                         "the file-size limit) and rerun; the earlier output, if any, is untouched") from None


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", guard: OutputGuard | None = None) -> Iterator[Any]:
    """Open a temp file for writing; it becomes ``path`` only when the block ends without error."""
    with atomic_path(path, guard) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if needed) for the block: serialises processes that
    fill one cache entry (a downloaded package) at the same time."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------------------- JSON
def write_json(path: Path, obj: Any, guard: OutputGuard | None = None) -> None:
    with atomic_file(path, guard=guard) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: Path, what: str = "file", *, expect: type | None = dict) -> Any:
    """Read JSON written by flexo; a missing or broken file, or one whose top level is not `expect`
    (an object by default), is a one-line FlexoError."""
    path = Path(path)
    if path.is_dir():
        raise FlexoError(f"{what} {path} is a folder, not a file: rerun the stage that writes it")
    if not path.is_file():
        raise FlexoError(f"{what} {path} does not exist: run the stage that writes it first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise FlexoError(f"{what} {path} is not valid JSON ({reason}): rerun the stage that writes it") from None
    if expect is not None and not isinstance(data, expect):
        want = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise FlexoError(f"{what} {path} holds {type(data).__name__} {_short(data)}, not {want}: "
                         "rerun the stage that writes it")
    return data


def _short(value: Any, n: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"
