"""The central flow: pull the owners' expert packages and the public artifacts from the DVC remote,
then merge → router tuning → evaluation. It runs in a clone that holds no owner data at all.

    python -m flows.central [--remote NAME]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flexo.params import load_params
from flows.dvc_tasks import dvc, pull

PUBLIC_OUTPUTS = ["curate_public", "tokenizer", "embed_public", "train_public"]


@flow(name="flexo-central", log_prints=True)
def central_flow(root: str = ".", remote: str | None = None) -> dict:
    root_path = Path(root).resolve()
    owners = load_params(root_path / "params.yaml").owners
    # The owners' packages and their router statistics (the owner's half of federated router tuning).
    pull(PUBLIC_OUTPUTS + [f"{stage}@{o}" for o in owners for stage in ("embed", "train_expert", "router_update")],
         str(root_path), remote)
    states = {}
    for stage in ("merge", "router_tune", "evaluate"):
        # --single-item: the owners' upstream stages ran on their machines; their data is not here.
        dvc(["repro", "--single-item", stage], root_path)
        states[stage] = "ran"
    table = root_path / "results" / "table.md"
    if table.is_file():
        create_markdown_artifact(key="flexo-central-results", markdown=table.read_text())
    return states


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--remote", default=None)
    a = ap.parse_args()
    print(central_flow(a.root, a.remote))
