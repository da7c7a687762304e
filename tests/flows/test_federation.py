"""Federation across machines, as separate clones: a bare git remote and a local DVC remote; a central
clone that publishes the public artifacts; two owner clones, each holding only its own documents, that
run their owner flows at the same time and publish their packages; the central flow that receives them,
merges, tunes and publishes the merged models; each owner scoring them on its own held-out text and
publishing the numbers; the centre's evaluation from those numbers; then one owner withdrawing. Asserts what each remote holds, that the centre
never holds owner text or an owner's model folder, and that the merged model equals the single-machine
merge of the same packages bit for bit."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml

from conftest import federation_origin, git_clone, owner_clone, public_built_as_dvc_would, sh, tree

OWNERS = ("alpha", "beta")


@pytest.fixture(scope="module")
def federation(tiny_project, tmp_path_factory, prefect_harness):
    from flows.central import central_flow
    from flows.owner import owner_flow
    from flows.public_artifacts import public_flow

    base = tmp_path_factory.mktemp("federation")
    dvc_remote = base / "dvc-remote"
    origin = federation_origin(tiny_project.root, base / "origin", dvc_remote)
    git_remote = base / "remote.git"
    sh(base, "git", "clone", "-q", "--bare", str(origin), str(git_remote))

    # The centre builds the public artifacts (here: the shared fixture's, recorded as DVC would) and publishes.
    central = git_clone(git_remote, base / "central")
    public_built_as_dvc_would(tiny_project.root, central)
    public_states = public_flow(root=str(central))
    assert public_states["train_public"] == "up to date" and public_states["publish"]["files"] > 0

    # Two owners on their own machines, each with only its own documents, at the same time.
    clones, results, errors = {}, {}, []
    for owner in OWNERS:
        clones[owner] = owner_clone(git_remote, base / owner, tiny_project, owner)

    def run(owner):
        try:
            results[owner] = owner_flow(owner, root=str(clones[owner]))
        except BaseException as e:  # noqa: BLE001 — reported below
            errors.append((owner, e))

    threads = [threading.Thread(target=run, args=(o,)) for o in OWNERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    # Round 1 at the centre: merge, tune, publish the merged models; the evaluation waits for the owners.
    first_round = central_flow(root=str(central))
    # Each owner scores the merged models on its own held-out text and publishes only the numbers.
    scored = {}
    for owner in OWNERS:
        scored[owner] = owner_flow(owner, root=str(clones[owner]), after_merge=True)
    central_states = central_flow(root=str(central))
    return {"central": central, "clones": clones, "git_remote": git_remote, "dvc_remote": dvc_remote,
            "owners": results, "public": public_states, "central_states": central_states,
            "first_round": first_round, "scored": scored}


def _remote_objects(dvc_remote: Path) -> set[str]:
    return {p.parent.name + p.name for p in dvc_remote.rglob("*") if p.is_file()}


def _listing(root: Path, pointer: Path) -> list[dict]:
    """The files a pushed folder pointer names (from DVC's .dir object in the project's cache)."""
    md5 = yaml.safe_load(pointer.read_text())["outs"][0]["md5"]
    return json.loads((root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).read_text())


def test_each_owner_ships_only_its_package_row_and_statistics(federation):
    remote = _remote_objects(federation["dvc_remote"])
    for owner, clone in federation["clones"].items():
        listing = _listing(clone, clone / "published" / owner / "package.dvc")
        assert sorted(e["relpath"] for e in listing) == ["expert.json", "expert.safetensors", "router.json",
                                                         "router.safetensors", "router_stats.json",
                                                         "router_stats.safetensors"]
        assert all(e["md5"] in remote for e in listing)  # every shipped file reached the remote
        shipped = federation["owners"][owner]["publish"]
        assert shipped["files"] == 6 and shipped["bytes"] == sum(
            (clone / "published" / owner / "package" / e["relpath"]).stat().st_size for e in listing)
        # ... and nothing else of the owner's: neither its text nor its full model nor its loss log
        import hashlib

        kept_home = [clone / "data" / "curated" / owner / "train.jsonl", clone / "data" / "heldout" / owner / "test.jsonl",
                     clone / "models" / "experts" / owner / "model" / "model.safetensors",
                     clone / "models" / "experts" / owner / "loss.csv"]
        for path in kept_home:
            assert hashlib.md5(path.read_bytes()).hexdigest() not in remote, path
        print(f"\n{owner} shipped {shipped['files']} files, {shipped['bytes']} bytes: "
              + ", ".join(f"{e['relpath']} {(clone / 'published' / owner / 'package' / e['relpath']).stat().st_size}"
                          for e in listing))


def test_owners_score_where_their_data_is_and_ship_only_numbers(federation):
    first = federation["first_round"]
    assert first["merge"] == "ran" and first["evaluate"].startswith("waiting for the scores of alpha, beta")
    # the 31-task stage needs only published artifacts: the centre runs it in its first round, with no owner data
    assert first["benchmark"] == "ran"
    for owner, clone in federation["clones"].items():
        states = federation["scored"][owner]
        assert states[f"score@{owner}"] == "ran" and states["receive-central"]
        listing = _listing(clone, clone / "published" / owner / "scores.dvc")
        assert [e["relpath"] for e in listing] == ["scores.json"]
        shipped = json.loads((clone / "published" / owner / "scores" / "scores.json").read_text())
        assert shipped["owner"] == owner and set(shipped["bpb"]) >= {"public", "flexolmo", "btm", "optout:alpha"}
        # the owner received the merged models and the other owner's package, never its data or model
        other = next(o for o in OWNERS if o != owner)
        assert (clone / "models" / "merged" / "config.json").is_file()
        assert (clone / "models" / "experts" / other / "expert.safetensors").is_file()
        assert not (clone / "models" / "experts" / other / "model").exists()
        assert not (clone / "data" / "heldout" / other).exists()


def test_the_git_remote_holds_one_pointer_per_publisher(federation, tmp_path):
    check = git_clone(federation["git_remote"], tmp_path / "check")
    assert sorted(p.relative_to(check).as_posix() for p in (check / "published").rglob("*.dvc")) == [
        "published/alpha/package.dvc", "published/alpha/scores.dvc", "published/beta/package.dvc",
        "published/beta/scores.dvc", "published/central/models.dvc", "published/public/artifacts.dvc"]
    assert not (check / "dvc.lock").exists() or "train_expert@" not in (check / "dvc.lock").read_text()


def test_the_centre_holds_no_owner_text_or_model_and_merges_bit_for_bit(federation, merged):
    central = federation["central"]
    for owner in OWNERS:
        assert not (central / "data" / "curated" / owner).exists()
        assert not (central / "data" / "heldout" / owner).exists()
        assert not (central / "models" / "experts" / owner / "model").exists()
        assert not [p for p in (central / "data" / "owners" / owner).rglob("*") if p.name != ".gitkeep"]
    assert tree(central / "models" / "merged") == tree(merged)  # the single-machine merge of the same packages


def test_the_central_view_is_current_and_its_metrics_are_json(federation):
    central = federation["central"]
    assert federation["first_round"]["merge"] == "ran" and federation["central_states"]["merge"] == "up to date"
    assert federation["central_states"]["evaluate"] == "ran"
    status = json.loads(sh(central, "flexo", "status", "--json").stdout)
    assert status["would_rerun"] == []
    assert {o: row["package"] for o, row in status["owners"].items()} == {"alpha": "present", "beta": "present"}
    assert all(s.split("@")[0] in ("curate", "embed", "train_expert", "router_update", "audit", "score")
               for s in status["inputs"])
    text = (central / "results" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    # every owner's domain is in the table, from the scores the owners shipped; no owner text is here
    assert metrics["public_only"] is False and metrics["domains"] == ["public", *OWNERS]
    assert metrics["scored_by_owners"] == list(OWNERS) and set(metrics["avg_owner_bpb"]) == set(metrics["bpb"])
    assert set(metrics["bpb"]) >= {"public", "flexolmo", "flexolmo-rt", "btm", "expert:alpha", "optout:beta",
                                   "optout-rt:alpha"}
    for owner in OWNERS:
        shipped = json.loads((federation["clones"][owner] / "results" / "scores" / f"{owner}.json").read_text())
        assert {m: s[owner] for m, s in metrics["bpb"].items()} == shipped["bpb"]
    assert "avg (owners)" in (central / "results" / "table.md").read_text()
    shown = sh(central, "dvc", "metrics", "show")
    assert "results/metrics.json" in shown.stdout


def test_an_unpublished_owner_stops_the_centre_with_one_line(federation, tmp_path):
    from flexo.errors import FlexoError  # noqa: F401  (the flow raises a PermanentFailure naming the owner)
    from flows.central import central_flow

    central = git_clone(federation["git_remote"], tmp_path / "central2")
    params = yaml.safe_load((central / "params.yaml").read_text())
    params["owners"] = ["alpha", "gamma"]
    (central / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(Exception, match=r"owner gamma has not published .*python -m flows.owner --owner gamma"):
        central_flow(root=str(central))


def test_the_central_flow_refuses_a_folder_with_owner_data(federation):
    from flows.central import central_flow

    with pytest.raises(Exception, match="holds the data of"):
        central_flow(root=str(federation["clones"]["alpha"]))


def test_an_owner_withdrawing_is_merged_out_at_the_centre(federation, ctx, tmp_path):
    from flows.central import central_flow
    from stages.merge import merge

    central = federation["central"]
    params = yaml.safe_load((central / "params.yaml").read_text())
    params["owners"] = ["alpha"]
    (central / "params.yaml").write_text(yaml.safe_dump(params))
    states = central_flow(root=str(central))
    assert states["merge"] == "ran" and "receive-beta" not in states
    assert states["evaluate"].startswith("waiting for the scores of alpha")  # alpha scored the old merge
    merged = json.loads((central / "models" / "merged" / "flexo.json").read_text())
    assert merged["experts"] == ["public", "alpha"]
    assert not (central / "models" / "experts" / "beta").exists()  # pruned after the merge
    params_single, layout = ctx
    single = merge(params_single, layout, exclude=["beta"], out=tmp_path / "alpha-only")
    assert single["experts"] == ["public", "alpha"]
    weights = lambda d: {k: v for k, v in tree(d).items() if k.endswith(".safetensors")}  # noqa: E731
    assert weights(central / "models" / "merged") == weights(tmp_path / "alpha-only")
