"""The whole pipeline as one Prefect flow on one machine: public → owners (concurrently) → merge →
router tuning → evaluation, each task a DVC stage (see flows/dvc_tasks.py).

    python -m flows.pipeline                     # runs in a temporary local Prefect server
    prefect deployment run flexo-pipeline/pipeline   # via prefect.yaml, on a worker
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flexo.params import load_params
from flows.dvc_tasks import run_stage

PUBLIC_STAGES = ["curate_public", "tokenizer", "embed_public", "train_public"]
FAN_IN_STAGES = ["merge", "router_tune", "evaluate"]


@flow(name="flexo-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def pipeline(root: str = ".", max_parallel_owners: int = 2) -> dict:
    """Every stage in order; the owners' branches run concurrently (at most `max_parallel_owners`)."""
    root_path = Path(root).resolve()
    owners = load_params(root_path / "params.yaml").owners
    states: dict[str, str] = {}
    for stage in PUBLIC_STAGES[:2]:
        states[stage] = run_stage(stage, str(root_path))
    public_done = run_stage.submit("embed_public", str(root_path))
    # Owner branches: curate → embed → train_expert, interleaved across owners `max_parallel_owners` at a time.
    for start in range(0, len(owners), max_parallel_owners):
        group = owners[start : start + max_parallel_owners]
        curated = {o: run_stage.submit(f"curate@{o}", str(root_path)) for o in group}
        embedded = {o: run_stage.submit(f"embed@{o}", str(root_path), wait_for=[curated[o]]) for o in group}
        for o in group:
            states[f"curate@{o}"], states[f"embed@{o}"] = curated[o].result(), embedded[o].result()
    states["embed_public"] = public_done.result()
    states["train_public"] = run_stage("train_public", str(root_path))
    for start in range(0, len(owners), max_parallel_owners):
        group = owners[start : start + max_parallel_owners]
        trained = {o: run_stage.submit(f"train_expert@{o}", str(root_path)) for o in group}
        for o in group:
            states[f"train_expert@{o}"] = trained[o].result()
        # The owner's half of federated router tuning: statistics of its own model on its own text.
        stats = {o: run_stage.submit(f"router_update@{o}", str(root_path)) for o in group}
        for o in group:
            states[f"router_update@{o}"] = stats[o].result()
    states["merge"] = run_stage("merge", str(root_path))
    # Owner-side stage on the merged model: the data-extraction audit, on the owner's own text.
    for start in range(0, len(owners), max_parallel_owners):
        group = owners[start : start + max_parallel_owners]
        futures = {f"audit@{o}": run_stage.submit(f"audit@{o}", str(root_path)) for o in group}
        for name, future in futures.items():
            states[name] = future.result()
    for stage in FAN_IN_STAGES[1:]:
        states[stage] = run_stage(stage, str(root_path))
    table = root_path / "results" / "table.md"
    if table.is_file():
        create_markdown_artifact(key="flexo-results", markdown=table.read_text(), description="bits per byte")
    return states


if __name__ == "__main__":
    print(pipeline())
