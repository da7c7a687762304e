"""Stage helpers for the day-to-day life of a pipeline: `flexo status` and the withdrawal clean-up.

    flexo status            each owner, whether its expert is current, what `dvc repro` would rerun

What would rerun comes from `dvc status` (the changed stages) plus everything downstream of them in
DVC's own stage graph — not from `dvc repro --dry`, which under-reports downstream stages (ENV.md).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import yaml

from flexo.errors import FlexoError
from flexo.fsutil import atomic_file, remove_path
from flexo.layout import Layout
from flexo.params import PUBLIC, Params, validate_owner_name

log = logging.getLogger(__name__)
OWNER_STAGES = ("curate", "embed", "train_expert", "router_update", "audit")


def _known_owner_dirs(layout: Layout) -> set[str]:
    names: set[str] = set()
    for parent in (layout.root / "data" / "curated", layout.root / "data" / "heldout", layout.root / "models" / "experts"):
        if parent.is_dir():
            names |= {p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")}
    router = layout.root / "models" / "router"
    if router.is_dir():
        names |= {p.stem for p in router.glob("*.safetensors")}
    return names - {PUBLIC}


def withdrawn_owners(params: Params, layout: Layout) -> list[str]:
    """Owners with artifacts on disk or entries in dvc.lock who are no longer in params.yaml."""
    names = _known_owner_dirs(layout)
    lock = layout.root / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        names |= {k.split("@", 1)[1] for k in stages if "@" in k and k.split("@", 1)[0] in OWNER_STAGES}
    return sorted(n for n in names if n not in params.owners)


def prune_withdrawn(params: Params, layout: Layout) -> list[str]:
    """Remove every trace of withdrawn owners: curated data, held-out split, router rows, expert
    folder, checkpoints and their `dvc.lock` entries. Called by the merge stage (the fan-in that reruns
    when `owners` changes), so withdrawing an owner from params.yaml is all a user has to do."""
    gone = withdrawn_owners(params, layout)
    for owner in gone:
        validate_owner_name(owner, "withdrawn owner")  # never build a path from anything else
        for path in (layout.curated(owner), layout.heldout(owner), layout.expert(owner),
                     layout.router_embedding(owner), layout.router_embedding(owner).with_suffix(".json"),
                     layout.router_update(owner), layout.router_update(owner).with_suffix(".json"),
                     layout.results / "extraction" / f"{owner}.json",
                     layout.checkpoints(f"expert-{owner}")):
            if path.exists():
                remove_path(path)
                log.info("withdrawn owner %s: removed %s", owner, path.relative_to(layout.root))
    lock = layout.root / "dvc.lock"
    if gone and lock.is_file():
        data = yaml.safe_load(lock.read_text()) or {}
        stages = data.get("stages", {})
        stale = [k for k in stages if "@" in k and k.split("@", 1)[1] in gone and k.split("@", 1)[0] in OWNER_STAGES]
        for k in stale:
            del stages[k]
        with atomic_file(lock) as f:
            yaml.safe_dump(data, f, sort_keys=False)
        log.info("withdrawn owners %s: dropped %d dvc.lock entries", gone, len(stale))
    return gone


def rerun_plan(root: Path) -> tuple[list[str], list[str]]:
    """(changed stages per `dvc status`, every stage `dvc repro` would run) in pipeline order."""
    import networkx as nx
    from dvc.repo import Repo

    try:
        # DVC names stages relative to the working directory: work from the project root.
        stack = contextlib.ExitStack()
        stack.enter_context(contextlib.chdir(root))
        repo = Repo(str(root))
    except Exception as e:  # not a DVC repo, broken dvc.yaml: one line either way
        stack.close()
        raise FlexoError(f"cannot open the DVC project at {root} ({type(e).__name__}: {e}): run `make dvc-init`") from None
    with stack, repo:
        changed = sorted(repo.status())
        graph = repo.index.graph
        by_name = {s.addressing: s for s in graph.nodes}
        rerun = set(changed)
        for name in changed:
            if name in by_name:  # edges point from a stage to the stages it depends on
                rerun |= {s.addressing for s in nx.ancestors(graph, by_name[name])}
        order = [s.addressing for s in reversed(list(nx.topological_sort(graph)))]
    return changed, [s for s in order if s in rerun]


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
    return {"owners": owners, "withdrawn": withdrawn_owners(params, layout), "changed": changed,
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
    p = sub.add_parser("status", help="each owner's expert: current or stale, and what dvc repro would rerun")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def handler(args):
        from flexo.cli import _ctx

        params, layout = _ctx(args)
        report = status(params, layout)
        return report if args.json else format_status(report)

    p.set_defaults(fn=handler)
