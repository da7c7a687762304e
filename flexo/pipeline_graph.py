"""The pipeline's stages and their order, read from dvc.yaml through DVC's own stage graph.

dvc.yaml is the one place the stage order is written. `flexo status` and the Prefect flows (the whole
pipeline, an owner's flow, the central flow) all derive what to run, in which order and on which
machine from `StageGraph`:

- `owner_stages(o)`: the `…@o` stages an owner runs before the merge (curate, embed, train_expert,
  router_update); `owner_late_stages(o)` those that need the merged model (the extraction audit, the
  owner-side scoring);
- `public_stages`: stages with no owner that some owner stage needs (curate_public, tokenizer, …);
- `central_stages`: the fan-in, stages with no owner that read owners' outputs: `merge_stages` (merge,
  router_tune) need only the owners' packages, `final_stages` (evaluate) what owners ship after the
  merge (their scores);
- `pushed(stages)`: the subset whose outputs may travel through a DVC remote (no `push: false` out:
  an owner's curated text never does).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from flexo.errors import FlexoError


@dataclass(frozen=True)
class StageGraph:
    order: list[str]  # every stage, in an order in which `dvc repro` could run them
    deps: dict[str, frozenset[str]]  # stage → the stages whose outputs it reads
    unpushed: frozenset[str] = field(default_factory=frozenset)  # stages with a `push: false` output

    def upstream(self, stage: str) -> set[str]:
        seen, todo = set(), list(self.deps.get(stage, ()))
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo += self.deps.get(s, ())
        return seen

    def downstream(self, stage: str) -> set[str]:
        return self.downstream_of([stage])

    def downstream_of(self, stages: Iterable[str]) -> set[str]:
        """Every stage that reads, directly or not, an output of one of `stages`: one walk over the edges
        (asking stage by stage walked the graph once per stage and per changed stage: cubic in owners,
        docs/bench/growth-2026-12-03.md)."""
        readers: dict[str, list[str]] = {}
        for s, ds in self.deps.items():
            for d in ds:
                readers.setdefault(d, []).append(s)
        seen: set[str] = set()
        todo = [r for st in stages for r in readers.get(st, ())]
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo += readers.get(s, ())
        return seen

    @staticmethod
    def owner_of(stage: str) -> str | None:
        return stage.split("@", 1)[1] if "@" in stage else None

    @property
    def central_stages(self) -> list[str]:
        """The fan-in: stages with no owner that read some owner stage's output (merge, router_tune, …)."""
        return [s for s in self.order if "@" not in s and any("@" in u for u in self.upstream(s))]

    @property
    def public_stages(self) -> list[str]:
        """Stages with no owner that read no owner's output (curate_public, tokenizer, train_public, …)."""
        central = set(self.central_stages)
        return [s for s in self.order if "@" not in s and s not in central]

    def owner_stages(self, owner: str) -> list[str]:
        """The owner's stages that run before the merge (on the owner's machine, before it publishes)."""
        late = set(self.owner_late_stages(owner))
        return [s for s in self.order if self.owner_of(s) == owner and s not in late]

    def owner_late_stages(self, owner: str) -> list[str]:
        """The owner's stages that read a central output (the merged model): they run after the merge."""
        central = set(self.central_stages)
        return [s for s in self.order if self.owner_of(s) == owner and self.upstream(s) & central]

    @property
    def merge_stages(self) -> list[str]:
        """The central stages that need only the owners' packages (merge, router_tune): the centre's first round."""
        late = {s for s in self.order if self.owner_of(s) and s in self.owner_late_stages(self.owner_of(s))}
        return [s for s in self.central_stages if not self.upstream(s) & late]

    @property
    def final_stages(self) -> list[str]:
        """The central stages that need what owners ship after the merge (evaluate reads their scores)."""
        first = set(self.merge_stages)
        return [s for s in self.central_stages if s not in first]

    def pushed(self, stages: list[str]) -> list[str]:
        return [s for s in stages if s not in self.unpushed]


# The working directory is the process's, not the thread's: two flows in threads of one process (the
# federation test runs two owners at once) must not interleave their chdir, or one reads the other's
# project and leaves the process in the wrong folder.
_CWD = threading.RLock()


@contextlib.contextmanager
def _repo(root: Path):
    from dvc.repo import Repo

    root = Path(root)
    try:
        # DVC names stages relative to the working directory: work from the project root.
        stack = contextlib.ExitStack()
        stack.enter_context(_CWD)
        stack.enter_context(contextlib.chdir(root))
        repo = Repo(str(root))
    except Exception as e:  # noqa: BLE001 — not a DVC repo, broken dvc.yaml: one line either way
        stack.close()
        raise FlexoError(f"cannot open the DVC project at {root} ({type(e).__name__}: {e}): run `make dvc-init`") from None
    with stack, repo:
        yield repo


def _graph(repo) -> StageGraph:
    import networkx as nx

    from dvc.stage import PipelineStage

    # dvc.yaml's stages only: a hand-off pointer (`published/<name>/….dvc`) is a DVC stage too, but no step.
    graph = repo.index.graph.subgraph([s for s in repo.index.graph.nodes if isinstance(s, PipelineStage)])
    # Dependencies first; among stages free to run, the order in which dvc.yaml lists them.
    position = {s.addressing: i for i, s in enumerate(repo.index.stages)}
    order = [s.addressing for s in nx.lexicographical_topological_sort(graph.reverse(copy=True),
                                                                      key=lambda s: position[s.addressing])]
    deps = {s.addressing: frozenset(d.addressing for d in graph.successors(s)) for s in graph.nodes}
    unpushed = frozenset(s.addressing for s in graph.nodes if any(not o.can_push for o in s.outs))
    return StageGraph(order, deps, unpushed)


def stage_graph(root: Path) -> StageGraph:
    with _repo(root) as repo:
        return _graph(repo)


def rerun_plan(root: Path, inputs: Callable[[str, StageGraph], bool] | None = None) -> tuple[list[str], list[str]]:
    """(changed stages per `dvc status`, every stage `dvc repro` would run) in pipeline order — not from
    `dvc repro --dry`, which under-reports downstream stages. Stages for which `inputs(stage, graph)` holds
    (whose outputs arrive from another machine) are left out, and nothing reruns because of them."""
    with _repo(root) as repo:
        graph = _graph(repo)
        changed = sorted(s for s in repo.status() if s in graph.deps)
    if inputs is not None:
        changed = [s for s in changed if not inputs(s, graph)]
    rerun = set(changed) | graph.downstream_of(changed)
    if inputs is not None:
        rerun = {s for s in rerun if not inputs(s, graph)}
    return changed, [s for s in graph.order if s in rerun]
