"""Stage `status`: the day-to-day view of a pipeline.

    flexo status [--json]     each owner's expert (current / stale / missing) — or, where the owner's data
                              is elsewhere, its received package (present / missing / outdated) — and
                              what `dvc repro` would rerun

What would rerun comes from `dvc status` (the changed stages) plus everything downstream of them in
DVC's own stage graph (flexo/pipeline_graph.py). Owners withdrawn from params.yaml since the last merge
are listed: the next merge removes what they left (flexo/owners.py).
"""

from __future__ import annotations

from flexo.federation import holds_owner_data, package_state
from flexo.layout import Layout
from flexo.owners import read_lock, withdrawal_plan
from flexo.params import Params
from flexo.pipeline_graph import rerun_plan
from flexo.project import stage_command


def status(params: Params, layout: Layout) -> dict:
    """Each owner's state and what `dvc repro` would rerun here. On a machine without an owner's data (the
    centre, or another owner) that owner's stages are inputs, not work: its state is that of its received
    package (present / missing / outdated) and its stages are left out of what would rerun; so are the
    public stages where the public artifacts were received rather than built."""
    here = set(holds_owner_data(layout, params.owners))
    public_received = ("train_public" not in read_lock(layout.root).get("stages", {})
                       and (layout.public_model / "flexo.json").is_file())
    seen_inputs: set[str] = set()

    def is_input(stage: str, graph) -> bool:
        owner = graph.owner_of(stage)
        found = (owner is not None and owner not in here) or (public_received and stage in graph.public_stages)
        if found:
            seen_inputs.add(stage)
        return found

    changed, rerun = rerun_plan(layout.root, is_input)
    inputs = seen_inputs
    owners = {}
    for owner in params.owners:
        if owner not in here:
            owners[owner] = {"package": package_state(layout, owner), "stages_to_rerun": []}
            continue
        package = layout.expert(owner) / "expert.json"
        stale = [s for s in rerun if s.endswith(f"@{owner}")]
        expert_stale = any(s in stale for s in (f"curate@{owner}", f"embed@{owner}", f"train_expert@{owner}"))
        owners[owner] = {
            "expert": "missing" if not package.is_file() else ("stale" if expert_stale else "current"),
            "stages_to_rerun": stale,
        }
    return {"owners": owners, "withdrawn": withdrawal_plan(params, layout).owners,
            "changed": [s for s in changed if s not in inputs], "would_rerun": rerun, "inputs": sorted(inputs)}


def format_status(report: dict) -> str:
    lines = [f"{'owner':<14} {'state':<17} stages to rerun"]
    for owner, row in report["owners"].items():
        state = f"expert {row['expert']}" if "expert" in row else f"package {row['package']}"
        lines.append(f"{owner:<14} {state:<17} {', '.join(row['stages_to_rerun']) or '-'}")
    if report["withdrawn"]:
        lines.append(f"withdrawn (removed at the next merge): {', '.join(report['withdrawn'])}")
    if report["inputs"]:
        lines.append(f"inputs here (their data is elsewhere): {', '.join(report['inputs'])}")
    lines.append(f"dvc repro would run: {', '.join(report['would_rerun']) or 'nothing (up to date)'}")
    return "\n".join(lines)


def add_cli(sub) -> None:
    def run(args, project) -> dict | str:
        report = status(project.params, project.layout)
        return report if args.json else format_status(report)

    p = stage_command(sub, "status", "each owner's expert: current or stale, and what dvc repro would rerun", run)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
