"""Run-dependent figures (wall times, tokens per second) of each stage run, kept out of every output that
DVC hashes — a timing inside `flexo.json` would give identical weights a different hash on every run and
every machine. They go to ROOT/.cache/timings.jsonl, one JSON line per record, read by `bench/run.py`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def record(root: Path, stage: str, **figures) -> None:
    """Append `{"stage": …, "finished": …, **figures}`; best effort (a log must never fail a stage)."""
    line = {"stage": stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), **figures}
    try:
        path = Path(root) / ".cache" / "timings.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    except OSError:
        pass
