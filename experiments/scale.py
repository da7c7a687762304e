"""The demo at a larger scale, beside the demo itself (issue 21): does the method's shortfall here come
from scale or from its design?

    .venv/bin/python experiments/scale.py run configs/scale4x.yaml     # ~2 h on 2 cores, in the background
    .venv/bin/python experiments/scale.py render                       # docs/scale.md from what has run

`run` builds a scratch project under .cache/scale/<preset>/ (a copy of the tracked files, the preset as its
params.yaml, its own DVC cache), runs the pipeline up to the evaluation (`dvc repro evaluate`: the audits
are not needed here) and then the routing-ceiling analysis (experiments/routing_ceiling.py) inside it, and
keeps the figures in docs/scale/<preset>/. The scratch project runs its own copy of the code (PYTHONPATH),
so editing this checkout while it trains changes nothing in the run. Rerunning resumes: DVC skips what is
done and training resumes from its checkpoints.

`render` writes docs/scale.md: the demo's figures (results/metrics.json, docs/routing_ceiling.json) and
each preset's, side by side, under the prediction that was written before the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "scale"
KEPT = ("results/metrics.json", "results/table.md", "results/routing_ceiling.json", "results/routing_ceiling.md",
        "models/public/flexo.json", "params.yaml")


def scratch_env(project: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(project)  # the scratch copy of flexo/ and stages/, not this checkout's
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"
    env.setdefault("FLEXO_DOWNLOADS", str(ROOT / ".cache" / "downloads"))  # the registry packages, fetched once
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
                 "DS_ACCELERATOR": "cpu", "HF_HOME": str(project / ".cache" / "hf")}.items():
        env[k] = v
    return env


def prepare(config: Path, project: Path) -> None:
    """A copy of the tracked files with the preset as params.yaml (kept if the project exists: resume)."""
    if not (project / "dvc.yaml").is_file():
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
        tmp = project.with_name(project.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel in files.decode().split("\0"):
            if rel and (ROOT / rel).is_file() and rel != "dvc.lock":
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, tmp / rel)
        shutil.rmtree(tmp / ".dvc", ignore_errors=True)
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp, check=True, env=scratch_env(tmp))
        subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=tmp, check=True, env=scratch_env(tmp))
        tmp.rename(project)
    shutil.copy2(config, project / "params.yaml")


def run(config: Path) -> None:
    name = config.stem
    project = ROOT / ".cache" / "scale" / name
    project.parent.mkdir(parents=True, exist_ok=True)
    prepare(config, project)
    env = scratch_env(project)
    check = subprocess.run([sys.executable, "-c", "import flexo; print(flexo.__file__)"], cwd=project, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert check.startswith(str(project)), f"the scratch project would run {check}, not its own copy"
    started = time.time()
    print(f"[scale] {name}: dvc repro evaluate in {project}", flush=True)
    subprocess.run(["dvc", "repro", "evaluate"], cwd=project, env=env, check=True)
    pipeline_s = time.time() - started
    print(f"[scale] {name}: routing ceiling", flush=True)
    subprocess.run([sys.executable, "experiments/routing_ceiling.py"], cwd=project, env=env, check=True)
    out = DOCS / name
    out.mkdir(parents=True, exist_ok=True)
    for rel in KEPT:
        shutil.copy2(project / rel, out / Path(rel).name)
    wall = {"pipeline_s": round(pipeline_s), "total_s": round(time.time() - started),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": f"{os.cpu_count()} cores"}
    (out / "wall.json").write_text(json.dumps(wall, indent=2) + "\n")
    print(f"[scale] {name}: done in {wall['total_s'] / 60:.0f} min; figures in {out.relative_to(ROOT)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a preset in its scratch project")
    r.add_argument("config", type=Path)
    sub.add_parser("render", help="write docs/scale.md")
    args = ap.parse_args()
    if args.cmd == "run":
        if not args.config.is_file():
            raise SystemExit(f"scale: error: preset {args.config} not found: pass a params file such as configs/scale4x.yaml")
        run(args.config.resolve())
    else:
        render()


def render() -> None:
    raise NotImplementedError  # written once the first figures exist (docs/scale.md holds the prediction)


if __name__ == "__main__":
    main()
