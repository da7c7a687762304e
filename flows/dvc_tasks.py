"""Prefect tasks that run DVC stages, and the commands every flow shares.

DVC decides what is stale; Prefect runs, retries, parallelises and shows. A DVC stage's heavy work (its
`cmd`, a `flexo` subcommand) may run concurrently with other stages', but every call into DVC itself
(`dvc status`, `dvc commit`, `push`, `pull`) goes through one in-process lock, so DVC's repository lock
is never contended: a stage runs only when `dvc status` says it is stale, and `dvc commit` records it in
dvc.lock exactly as `dvc repro` would.

A stage's own log lines (its warnings, `flexo: error: …`) and a progress line every half minute reach
the Prefect log as the stage runs. A failure that a retry cannot fix is not retried: flexo's one-line
refusals (exit status 2: bad input, a missing hand-off) and DVC's missing files.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefect import get_run_logger, task

DVC_LOCK = threading.Lock()
# A line of flexo's (or DVC's) own logging, worth showing in the Prefect log as it comes.
_LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d (INFO|WARNING|ERROR)|flexo: error|WARNING|ERROR)")
_PROGRESS_EVERY_S = 30.0


class PermanentFailure(RuntimeError):
    """A command failed in a way that running it again cannot fix (not retried)."""


def _env() -> dict:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # the venv's flexo and dvc come first
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _logger():
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 — outside a flow or task run (a plain call): stay quiet
        return None


def run_command(cmd: list[str] | str, root: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run `cmd` in `root`; its log lines and a progress line every 30 s go to the Prefect log."""
    shell = isinstance(cmd, str)
    shown = cmd if shell else shlex.join(cmd)
    log = _logger()
    proc = subprocess.Popen(cmd, cwd=root, env=_env(), shell=shell, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines, last_progress = [], time.monotonic()
    for chunk in proc.stdout:
        for line in re.split(r"[\r\n]", chunk):  # tqdm redraws with \r
            line = line.strip()
            if not line:
                continue
            lines.append(line)
            if log is not None and _LOG_LINE.match(line):
                log.info(line)
            elif log is not None and time.monotonic() - last_progress > _PROGRESS_EVERY_S:
                log.info("… %s", line[-200:])
                last_progress = time.monotonic()
    code = proc.wait()
    out = "\n".join(lines)
    if check and code != 0:
        tail = lines[-1] if lines else ""
        permanent = code == 2 or "missing" in out.lower() and "cache" in out.lower()
        error = PermanentFailure if permanent else RuntimeError
        raise error(f"`{shown}` failed with exit {code}: {tail}")
    return subprocess.CompletedProcess(cmd, code, out, "")


def dvc(args: list[str], root: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    with DVC_LOCK:
        return run_command([sys.executable, "-m", "dvc", *args], root, check=check)


def stage_command(stage: str, root: Path) -> str:
    from dvc.repo import Repo

    with DVC_LOCK, Repo(str(root)) as repo:
        # `name` is the stage's name inside dvc.yaml (`addressing` is relative to the process's cwd)
        matches = [s for s in repo.index.stages if getattr(s, "name", None) == stage]
        if not matches:
            raise PermanentFailure(f"no DVC stage named {stage!r} in {root}/dvc.yaml")
        return matches[0].cmd


def is_stale(stage: str, root: Path) -> bool:
    return dvc(["status", "--quiet", stage], root, check=False).returncode != 0


def retry_unless_permanent(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a transient failure, never a PermanentFailure."""
    try:
        state.result()
    except PermanentFailure:
        return False
    except Exception:  # noqa: BLE001 — anything else may be transient (a busy lock, a network hiccup)
        return True
    return True


@task(name="dvc-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_permanent)
def run_stage(stage: str, root: str = ".") -> str:
    """Run one DVC stage if `dvc status` says it is stale, then record it with `dvc commit`."""
    log = get_run_logger()
    root_path = Path(root).resolve()
    if not is_stale(stage, root_path):
        log.info("%s is up to date", stage)
        return "up to date"
    cmd = stage_command(stage, root_path)
    log.info("running %s: %s", stage, cmd)
    started = time.monotonic()
    run_command(cmd, root_path)
    dvc(["commit", "--force", "--quiet", stage], root_path)
    log.info("%s done in %.0f s", stage, time.monotonic() - started)
    return "ran"
