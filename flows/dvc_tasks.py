"""Prefect tasks that run DVC stages.

DVC decides what is stale; Prefect runs, retries, parallelises and shows. A DVC stage's heavy work (its
`cmd`, a `flexo` subcommand) may run concurrently with other stages', but every call into DVC itself
(`dvc status`, `dvc commit`, `push`, `pull`) goes through one in-process lock, so DVC's repository lock
is never contended: a stage runs only when `dvc status` says it is stale, and `dvc commit` records it in
dvc.lock exactly as `dvc repro` would.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from prefect import get_run_logger, task

DVC_LOCK = threading.Lock()


def _env() -> dict:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # the venv's flexo and dvc come first
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _run(cmd: list[str] | str, root: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    shell = isinstance(cmd, str)
    r = subprocess.run(cmd, cwd=root, env=_env(), shell=shell, capture_output=True, text=True)
    if check and r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        shown = cmd if shell else shlex.join(cmd)
        raise RuntimeError(f"`{shown}` failed with exit {r.returncode}: {tail[0]}")
    return r


def dvc(args: list[str], root: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    with DVC_LOCK:
        return _run([sys.executable, "-m", "dvc", *args], root, check=check)


def stage_command(stage: str, root: Path) -> str:
    from dvc.repo import Repo

    with DVC_LOCK, Repo(str(root)) as repo:
        # `name` is the stage's name inside dvc.yaml (`addressing` is relative to the process's cwd)
        matches = [s for s in repo.index.stages if s.name == stage]
        if not matches:
            raise ValueError(f"no DVC stage named {stage!r} in {root}/dvc.yaml")
        return matches[0].cmd


def is_stale(stage: str, root: Path) -> bool:
    return dvc(["status", "--quiet", stage], root, check=False).returncode != 0


@task(name="dvc-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=5)
def run_stage(stage: str, root: str = ".") -> str:
    """Run one DVC stage if `dvc status` says it is stale, then record it with `dvc commit`."""
    log = get_run_logger()
    root_path = Path(root).resolve()
    if not is_stale(stage, root_path):
        log.info("%s is up to date", stage)
        return "up to date"
    cmd = stage_command(stage, root_path)
    log.info("running %s: %s", stage, cmd)
    _run(cmd, root_path)
    dvc(["commit", "--force", "--quiet", stage], root_path)
    return "ran"


@task(name="dvc-push", retries=2, retry_delay_seconds=10)
def push(targets: list[str], root: str = ".", remote: str | None = None) -> None:
    dvc(["push", *(["-r", remote] if remote else []), *targets], Path(root).resolve())


@task(name="dvc-pull", retries=2, retry_delay_seconds=10)
def pull(targets: list[str], root: str = ".", remote: str | None = None) -> None:
    dvc(["pull", *(["-r", remote] if remote else []), *targets], Path(root).resolve())
