"""flexo.pipeline_graph: which stages run where and in which order — on a hand-built graph, and on this
repository's dvc.yaml as DVC reads it."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from flexo.errors import FlexoError
from flexo.pipeline_graph import StageGraph, stage_graph


@pytest.fixture
def graph() -> StageGraph:
    """pub → (curate@a → train@a), (curate@b → train@b) → merge → audit@a, tune → eval."""
    deps = {"pub": set(), "curate@a": set(), "train@a": {"curate@a", "pub"}, "curate@b": set(),
            "train@b": {"curate@b", "pub"}, "merge": {"pub", "train@a", "train@b"}, "audit@a": {"merge", "curate@a"},
            "tune": {"merge", "pub"}, "eval": {"tune", "merge"}}
    order = ["pub", "curate@a", "train@a", "curate@b", "train@b", "merge", "audit@a", "tune", "eval"]
    return StageGraph(order, {k: frozenset(v) for k, v in deps.items()}, frozenset({"curate@a", "curate@b"}))


def test_roles_of_a_hand_built_graph(graph):
    assert graph.central_stages == ["merge", "tune", "eval"]  # no owner, but some owner stage upstream
    assert graph.public_stages == ["pub"]
    assert graph.owner_stages("a") == ["curate@a", "train@a"]  # before the merge
    assert graph.owner_late_stages("a") == ["audit@a"]  # reads the merged model: after it
    assert graph.owner_stages("b") == ["curate@b", "train@b"] and graph.owner_late_stages("b") == []
    assert graph.owner_stages("c") == []
    assert graph.pushed(graph.order) == ["pub", "train@a", "train@b", "merge", "audit@a", "tune", "eval"]
    assert graph.pushed(["curate@a", "merge"]) == ["merge"]


def test_upstream_downstream_and_owner_of(graph):
    assert graph.upstream("eval") == {"tune", "merge", "pub", "train@a", "train@b", "curate@a", "curate@b"}
    assert graph.upstream("pub") == set() and graph.upstream("unknown") == set()
    assert graph.downstream("curate@b") == {"train@b", "merge", "audit@a", "tune", "eval"}
    assert graph.downstream("eval") == set()
    # of a set, in one walk: the union of each one's, the same as asking every stage for its upstream
    for changed in (["curate@a", "curate@b"], ["train@b", "tune"], ["pub"], []):
        want = {s for s in graph.order if any(c in graph.upstream(s) for c in changed)}
        assert graph.downstream_of(changed) == want == set().union(*(graph.downstream(c) for c in changed))
    assert (StageGraph.owner_of("audit@a"), StageGraph.owner_of("merge")) == ("a", None)
    assert StageGraph.owner_of("x@y@z") == "y@z"


def test_this_repositorys_dvc_yaml():
    graph = stage_graph(REPO)
    owners = yaml.safe_load((REPO / "params.yaml").read_text())["owners"]
    pos = {s: i for i, s in enumerate(graph.order)}
    assert graph.order[0] == "curate_public" and len(pos) == len(graph.order)
    assert pos["merge"] < pos["router_tune"] < pos["evaluate"]
    assert graph.central_stages == ["merge", "router_tune", "evaluate", "benchmark"]
    # the centre's two rounds: the merge stages (and the 31-task benchmark) need only packages, evaluate the
    # owners' scores
    assert graph.merge_stages == ["merge", "router_tune", "benchmark"] and graph.final_stages == ["evaluate"]
    assert graph.public_stages == ["curate_public", "tokenizer", "embed_public", "train_public"]
    for owner in owners:
        assert pos[f"audit@{owner}"] > pos["merge"]
        assert pos[f"train_expert@{owner}"] < pos["merge"]
        assert graph.owner_stages(owner) == [f"{s}@{owner}" for s in ("curate", "embed", "train_expert", "router_update")]
        assert graph.owner_late_stages(owner) == [f"audit@{owner}", f"score@{owner}"]
        assert f"curate@{owner}" not in graph.pushed(graph.order)  # an owner's text never goes to a remote
    assert graph.unpushed == {f"curate@{o}" for o in owners}
    # every stage's dependencies come before it
    assert all(pos[d] < pos[s] for s, deps in graph.deps.items() for d in deps)


def test_a_folder_without_dvc_is_one_line(tmp_path):
    with pytest.raises(FlexoError, match="cannot open the DVC project at .*: run `make dvc-init`") as e:
        stage_graph(tmp_path)
    assert "\n" not in str(e.value)
