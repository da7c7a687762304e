"""Owner isolation and untrusted files, checked from the project itself: dvc.yaml's resolved stages
and the source code."""

import re
from pathlib import Path

import pytest

from conftest import REPO

SOURCE_DIRS = ("flexo", "stages", "flows", "bench")


@pytest.fixture(scope="module")
def stages():
    """Every resolved DVC stage (foreach expanded over params.yaml owners) → its dependency paths."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {s.addressing: [Path(d.def_path).as_posix() for d in s.deps] for s in repo.index.stages}


def _owner_paths(owner: str) -> tuple[str, ...]:
    return (f"data/owners/{owner}", f"data/curated/{owner}", f"data/heldout/{owner}",
            f"models/router/{owner}.", f"models/experts/{owner}", f"models/router_updates/{owner}.")


def test_every_owner_stage_reads_only_its_own_data_and_public_artifacts(stages):
    import yaml

    owners = yaml.safe_load((REPO / "params.yaml").read_text())["owners"]
    owner_stages = {name: deps for name, deps in stages.items() if "@" in name}
    assert {n.split("@")[1] for n in owner_stages} == set(owners)
    for name, deps in owner_stages.items():
        owner = name.split("@")[1]
        for dep in deps:
            others = [o for o in owners if o != owner and dep.startswith(_owner_paths(o))]
            assert not others, f"{name} depends on {dep}, which belongs to {others}"
            # Other owners' packages and the merged models are shared artifacts: only the stages after the
            # merge (the extraction audit, the owner-side scoring) read them.
            late = name.startswith(("audit@", "score@"))
            assert (not dep.startswith("models/experts") or dep.startswith(f"models/experts/{owner}")
                    or (dep == "models/experts" and name.startswith("score@"))), (name, dep)
            assert not dep.startswith("models/merged") or late, (name, dep)
            if dep.startswith("data/curated/"):
                assert dep in (f"data/curated/{owner}", "data/curated/public"), (name, dep)


def test_shared_stages_depend_on_no_owners_curated_data(stages):
    for name, deps in stages.items():
        if "@" in name:
            continue
        for dep in deps:
            assert not dep.startswith("data/owners"), (name, dep)
            if dep.startswith("data/curated"):
                assert dep == "data/curated/public", (name, dep)
            if dep.startswith("data/heldout"):
                # an owner's held-out text is as private as its training text: only public text is read here
                assert dep == "data/heldout/public" and name == "evaluate", (name, dep)
    assert "data/curated/public" in stages["tokenizer"] and len([d for d in stages["tokenizer"] if d.startswith("data")]) == 1


def test_evaluate_reads_no_owner_data_only_the_scores_owners_ship(stages):
    import yaml

    owners = yaml.safe_load((REPO / "params.yaml").read_text())["owners"]
    deps = stages["evaluate"]
    assert "data/heldout" not in deps and "data/curated" not in deps
    for owner in owners:
        assert not any(d.startswith((f"data/heldout/{owner}", f"data/curated/{owner}", f"data/owners/{owner}"))
                       for d in deps), owner
    assert "results/scores" in deps and "data/heldout/public" in deps
    # every owner's domain is scored where its data is, by a stage of that owner
    for owner in owners:
        assert f"data/heldout/{owner}" in stages[f"score@{owner}"]


def _python_files():
    for d in SOURCE_DIRS:
        yield from (REPO / d).rglob("*.py")


def test_no_pickle_on_any_path_that_reads_weights_or_data():
    banned = re.compile(r"\btorch\.load\(|\bimport pickle\b|\bpickle\.loads?\(|\bfrom pickle\b|\bjoblib\b|"
                        r"\bnp\.load\([^)]*allow_pickle=True|weights_only\s*=\s*False")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in _python_files()
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if banned.search(line) and not line.lstrip().startswith("#")]
    assert offenders == []


def test_no_trust_remote_code_anywhere():
    offenders = [str(p.relative_to(REPO)) for p in _python_files() if "trust_remote_code=True" in p.read_text()]
    assert offenders == []


def test_weights_are_loaded_from_safetensors_only():
    # Every from_pretrained of a model in our code asks for safetensors (no .bin pickle fallback).
    for p in _python_files():
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if ("ForCausalLM.from_pretrained(" in code or "AutoModel.from_pretrained(" in code) and "`" not in code:
                block = "\n".join(p.read_text().splitlines()[i - 1 : i + 3])
                assert "use_safetensors=True" in block, f"{p.relative_to(REPO)}:{i}"
