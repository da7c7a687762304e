"""The flow that builds and publishes the public artifacts, once, before any owner starts: the public
stages of dvc.yaml (curate the public text, train the tokenizer, the public router row and the public
model), then a push of `published/public/artifacts` (flows/handoff.py) for every owner to pull.

    python -m flows.public_artifacts [--remote NAME]

The order of a federation: this flow, then each owner's flow (flows/owner.py) on its own machine, then
the central flow (flows/central.py). Usually run in the central machine's clone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from flexo.params import PUBLIC
from flexo.pipeline_graph import stage_graph
from flows.dvc_tasks import run_stage
from flows.handoff import publish


@flow(name="flexo-public", log_prints=True)
def public_flow(root: str = ".", remote: str | None = None) -> dict:
    root_path = Path(root).resolve()
    print(f"flexo public flow in {root_path}")
    states = {stage: run_stage(stage, str(root_path)) for stage in stage_graph(root_path).public_stages}
    states["publish"] = publish(PUBLIC, str(root_path), remote)
    return states


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--remote", default=None)
    a = ap.parse_args()
    print(public_flow(a.root, a.remote))
