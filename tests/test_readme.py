"""The README's commands, exactly as written, in a new shell (no venv activated) on a fresh copy of the
repository (the files git tracks or would track, as a clone has them) with this checkout's `.venv`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

MARKER = "<!-- readme-commands -->"
EXPENSIVE = ("dvc repro", "make ")  # the whole pipeline: `make demo` is its test


def readme_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    assert MARKER in text, f"README.md lost the {MARKER} block this test runs"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def fresh_copy(dst: Path) -> Path:
    """The working tree as a fresh clone would have it: tracked and untracked-but-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    (dst / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)  # what `make install` builds
    return dst


def test_the_readme_commands_work_as_written(tmp_path):
    if not (REPO / ".venv" / "bin" / "activate").is_file():
        pytest.skip("no .venv here (make install builds it)")
    lines = readme_block()
    assert lines[0].startswith(". .venv/bin/activate")
    cheap = [line for line in lines if not line.startswith(EXPENSIVE)]
    assert len(cheap) >= 4 and len(cheap) < len(lines)
    root = fresh_copy(tmp_path / "clone")
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env["DVC_SITE_CACHE_DIR"] = str(tmp_path / "dvc-site")
    script = "set -euo pipefail\n" + "\n".join(cheap) + "\n"
    r = subprocess.run(["bash", "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{script}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "merge" in r.stdout and "dvc repro would run" in r.stdout  # --help, then status's table
