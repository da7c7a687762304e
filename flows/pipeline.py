"""The whole pipeline as one Prefect flow on one machine: every DVC stage of dvc.yaml, each a task that
starts as soon as the stages it reads from are done (see flows/dvc_tasks.py), two at a time.

    python -m flows.pipeline                          # runs in a temporary local Prefect server
    prefect deployment run flexo-pipeline/pipeline    # via prefect.yaml, on a worker

The stage order is dvc.yaml's (flexo.pipeline_graph): nothing here lists stages.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flexo.pipeline_graph import stage_graph
from flows.dvc_tasks import run_stage


# Two workers: two owners' stages run side by side on a 2-core machine. Submitting in dependency order
# keeps the pool free of deadlock: a task only ever waits for tasks submitted (and started) before it.
@flow(name="flexo-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def pipeline(root: str = ".") -> dict:
    """Every stage of dvc.yaml; each runs when the stages it depends on are done."""
    root_path = Path(root).resolve()
    graph = stage_graph(root_path)
    futures = {}
    for stage in graph.order:
        futures[stage] = run_stage.submit(stage, str(root_path), wait_for=[futures[d] for d in graph.deps[stage]])
    states = {stage: future.result() for stage, future in futures.items()}
    table = root_path / "results" / "table.md"
    if table.is_file():
        create_markdown_artifact(key="flexo-results", markdown=table.read_text(), description="bits per byte")
    return states


if __name__ == "__main__":
    print(pipeline())
