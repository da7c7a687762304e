"""Prefect tasks that move a hand-off between machines (flexo/federation.py says what is in one).

`publish(name)`: stage the publisher's files into `published/<name>/…`, `dvc add` that folder, `dvc push`
its bytes to the DVC remote, then commit just the pointer (`published/<name>/….dvc` and the `.gitignore`
beside it) and push it to the git remote, rebasing on whatever other publishers pushed meanwhile (their
pointers are other files, so a rebase never conflicts). `receive(name)`: fetch the pointers from the
git remote, refuse with one line naming who must run what when the hand-off is not there, `dvc pull` its
bytes and install them where the pipeline's stages read them.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task

from flexo import federation
from flexo.errors import FlexoError
from flexo.layout import Layout
from flexo.params import CENTRAL, PUBLIC
from flows.dvc_tasks import PermanentFailure, dvc, retry_unless_permanent, run_command

GIT = ["git", "-c", "user.name=flexo", "-c", "user.email=flexo@localhost"]
PUSH_ATTEMPTS = 5


def git(args: list[str], root: Path, *, check: bool = True):
    return run_command([*GIT, *args], root, check=check)


def _has_upstream(root: Path) -> bool:
    return git(["rev-parse", "--abbrev-ref", "@{upstream}"], root, check=False).returncode == 0


def sync_pointers(root: Path) -> None:
    """Bring in the pointers other machines published (local edits, e.g. dvc.lock, are kept aside)."""
    if _has_upstream(root):
        git(["pull", "--rebase", "--autostash", "--quiet"], root)


def _who(name: str, kind: str | None = None) -> str:
    if name == PUBLIC:
        return "run the public flow first (python -m flows.public_artifacts)"
    if name == CENTRAL:
        return "the centre must run its flow first (python -m flows.central)"
    if kind == federation.SCORES_FOLDER:
        return f"owner {name} must score the merged models (python -m flows.owner --owner {name} --after-merge)"
    return f"owner {name} must run its owner flow (python -m flows.owner --owner {name})"


@task(name="publish", task_run_name="publish-{name}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_permanent)
def publish(name: str, root: str = ".", remote: str | None = None, kind: str | None = None) -> dict:
    """Ship `name`'s hand-off (of `kind`, flexo/federation.py): its bytes to the DVC remote, its pointer to
    the git remote."""
    log = get_run_logger()
    root_path = Path(root).resolve()
    layout = Layout.at(root_path)
    try:
        folder = federation.stage_handoff(layout, name, kind)
    except FlexoError as e:
        raise PermanentFailure(str(e)) from None
    rel = folder.relative_to(root_path)
    dvc(["add", "--quiet", str(rel)], root_path)
    dvc(["push", *(["-r", remote] if remote else []), str(rel) + ".dvc"], root_path)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    shipped = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    git(["add", str(rel) + ".dvc", str(rel.parent / ".gitignore")], root_path)
    if git(["diff", "--cached", "--quiet"], root_path, check=False).returncode != 0:
        git(["commit", "--quiet", "-m", f"publish {name} {folder.name}", "--", str(rel) + ".dvc", str(rel.parent / ".gitignore")],
            root_path)
    if _has_upstream(root_path):
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            sync_pointers(root_path)  # another publisher may have pushed its own pointer meanwhile
            if git(["push", "--quiet"], root_path, check=False).returncode == 0:
                break
            if attempt == PUSH_ATTEMPTS:
                raise RuntimeError(f"git push of {name}'s pointer failed {PUSH_ATTEMPTS} times")
            time.sleep(attempt)
    log.info("published %s: %d files, %d bytes (%s)", name, shipped["files"], shipped["bytes"], rel)
    return shipped


@task(name="receive", task_run_name="receive-{name}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_permanent)
def receive(name: str, root: str = ".", remote: str | None = None, kind: str | None = None) -> list[str]:
    """Pull `name`'s published hand-off (of `kind`) and install it; one line naming who must act when it is
    absent."""
    log = get_run_logger()
    root_path = Path(root).resolve()
    layout = Layout.at(root_path)
    sync_pointers(root_path)
    where = federation.pointer(layout, name, kind)
    if not where.is_file():
        what = {PUBLIC: "the public artifacts are", CENTRAL: "the merged models are"}.get(name, f"owner {name} has")
        raise PermanentFailure(f"{what} not published ({where.relative_to(root_path)} is not in the git remote): "
                               f"{_who(name, where.stem)}")
    rel = where.relative_to(root_path)
    dvc(["pull", *(["-r", remote] if remote else []), str(rel)], root_path)
    try:
        installed = federation.install(layout, name, kind)
    except FlexoError as e:
        raise PermanentFailure(str(e)) from None
    log.info("received %s %s: %s", name, where.stem, ", ".join(installed))
    return installed


def published(name: str, root: str = ".", kind: str | None = None) -> bool:
    """Whether `name` has published a hand-off of `kind` (after fetching the others' pointers)."""
    root_path = Path(root).resolve()
    sync_pointers(root_path)
    return federation.pointer(Layout.at(root_path), name, kind).is_file()
