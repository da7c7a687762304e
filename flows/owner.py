"""The flow a data owner runs on its own machine: curate → embed → train its expert → push the expert
package (and its router row) to the shared DVC remote. Curated data is `push: false` in dvc.yaml: the
owner's text never leaves its machine.

    python -m flows.owner --owner news [--remote NAME]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from flexo.params import load_params
from flows.dvc_tasks import push, run_stage


@flow(name="flexo-owner", log_prints=True)
def owner_flow(owner: str, root: str = ".", remote: str | None = None, public_stages: bool = True) -> dict:
    root_path = Path(root).resolve()
    load_params(root_path / "params.yaml").check_owner(owner)
    states = {}
    if public_stages:  # public artifacts: pulled from the remote in a real deployment, or rebuilt here
        for stage in ("curate_public", "tokenizer", "embed_public", "train_public"):
            states[stage] = run_stage(stage, str(root_path))
    # The owner's half of federated router tuning (router_update) needs only its own model and text:
    # it ships the statistics of its router inputs together with the expert package.
    for stage in (f"curate@{owner}", f"embed@{owner}", f"train_expert@{owner}", f"router_update@{owner}"):
        states[stage] = run_stage(stage, str(root_path))
    push([f"embed@{owner}", f"train_expert@{owner}", f"router_update@{owner}"], str(root_path), remote)
    states["push"] = "pushed"
    return states


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owner", required=True)
    ap.add_argument("--root", default=".")
    ap.add_argument("--remote", default=None)
    a = ap.parse_args()
    print(owner_flow(a.owner, a.root, a.remote))
