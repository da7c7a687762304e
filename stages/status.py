"""Stage `status`: the day-to-day view of a pipeline.

    flexo status [--json]     each owner's expert (current / stale / missing) and what `dvc repro` would rerun

What would rerun comes from `dvc status` (the changed stages) plus everything downstream of them in
DVC's own stage graph (flexo/pipeline_graph.py). Owners withdrawn from params.yaml since the last merge
are listed: the next merge removes what they left (flexo/owners.py).
"""

from __future__ import annotations

from flexo.layout import Layout
from flexo.owners import withdrawal_plan
from flexo.params import Params
from flexo.pipeline_graph import rerun_plan
from flexo.project import stage_command


def status(params: Params, layout: Layout) -> dict:
    changed, rerun = rerun_plan(layout.root)
    owners = {}
    for owner in params.owners:
        package = layout.expert(owner) / "expert.json"
        stale = [s for s in rerun if s.endswith(f"@{owner}")]
        expert_stale = any(s in stale for s in (f"curate@{owner}", f"embed@{owner}", f"train_expert@{owner}"))
        owners[owner] = {
            "expert": "missing" if not package.is_file() else ("stale" if expert_stale else "current"),
            "stages_to_rerun": stale,
        }
    return {"owners": owners, "withdrawn": withdrawal_plan(params, layout).owners, "changed": changed,
            "would_rerun": rerun}


def format_status(report: dict) -> str:
    lines = [f"{'owner':<14} {'expert':<8} stages to rerun"]
    for owner, row in report["owners"].items():
        lines.append(f"{owner:<14} {row['expert']:<8} {', '.join(row['stages_to_rerun']) or '-'}")
    if report["withdrawn"]:
        lines.append(f"withdrawn (removed at the next merge): {', '.join(report['withdrawn'])}")
    lines.append(f"dvc repro would run: {', '.join(report['would_rerun']) or 'nothing (up to date)'}")
    return "\n".join(lines)


def add_cli(sub) -> None:
    def run(args, project) -> dict | str:
        report = status(project.params, project.layout)
        return report if args.json else format_status(report)

    p = stage_command(sub, "status", "each owner's expert: current or stale, and what dvc repro would rerun", run)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
