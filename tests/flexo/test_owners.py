"""flexo.owners: who was withdrawn since the last merge (dvc.lock, else the merged model's flexo.json),
and the clean-up after a successful merge — never a package that no merge used, never on another
params file's say."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import yaml

from flexo.errors import FlexoError
from flexo.layout import Layout
from flexo.owners import Withdrawal, prune_withdrawn, read_lock, withdrawal_plan
from flexo.params import load_params
from stages.merge import merge


def _withdraw_beta(layout, *, lock: bool) -> None:
    raw = yaml.safe_load(layout.params.read_text())
    raw["owners"] = ["alpha"]
    layout.params.write_text(yaml.safe_dump(raw))
    if lock:  # DVC's record of the last merge: it had alpha and beta
        (layout.root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
            "merge": {"cmd": "flexo merge", "params": {"params.yaml": {"owners": ["alpha", "beta"]}}},
            "train_expert@beta": {"cmd": "flexo train-expert --owner beta"}}}))


# ------------------------------------------------------------------------- through the merge stage
def test_withdrawal_cleans_up_only_after_a_successful_merge(project_copy, caplog):
    layout = project_copy.layout
    params = load_params(layout.params)
    merge(params, layout)  # the last merge: alpha and beta
    _withdraw_beta(layout, lock=True)
    params = load_params(layout.params)
    with caplog.at_level("INFO", logger="flexo.owners"):
        meta = merge(params, layout)
    assert meta["experts"] == ["public", "alpha"]
    assert set(meta["withdrawn_removed"]["beta"]) == {"data/curated/beta", "data/heldout/beta",
                                                      "models/router/beta.safetensors", "models/router/beta.json",
                                                      "models/experts/beta"}
    assert not layout.expert("beta").exists() and layout.expert("alpha").exists()
    assert "train_expert@beta" not in (layout.root / "dvc.lock").read_text()
    assert any("withdrawn owner beta: removed models/experts/beta" in r.getMessage() for r in caplog.records)


def test_a_package_never_merged_is_never_deleted(project_copy):
    """A package received before its owner is in params.yaml, and a withdrawn owner whose package no merge
    ever used: both stay (the withdrawn owner's data and rows go, per dvc.lock)."""
    layout = project_copy.layout
    shutil.copytree(layout.expert("beta"), layout.root / "models" / "experts" / "gamma")
    _withdraw_beta(layout, lock=True)  # no models/merged: no evidence that beta's package was ever merged
    meta = merge(load_params(layout.params), layout)
    assert (layout.root / "models" / "experts" / "gamma" / "expert.safetensors").is_file()
    assert layout.expert("beta").is_dir()
    assert "models/experts/beta" not in meta["withdrawn_removed"]["beta"]
    assert not layout.curated("beta").exists()


def test_without_dvc_the_last_merged_model_says_who_was_withdrawn(project_copy):
    layout = project_copy.layout
    merge(load_params(layout.params), layout)
    _withdraw_beta(layout, lock=False)
    meta = merge(load_params(layout.params), layout)
    assert "models/experts/beta" in meta["withdrawn_removed"]["beta"] and not layout.expert("beta").exists()


def test_a_merge_with_another_params_file_withdraws_nobody(project_copy, tmp_path):
    """`flexo --params other.yaml merge` listing fewer owners merges them, and deletes nothing of the others:
    only the project's own params.yaml speaks for who was withdrawn."""
    layout = project_copy.layout
    merge(load_params(layout.params), layout)
    other = tmp_path / "alpha-only.yaml"
    other.write_text(layout.params.read_text().replace("owners: [alpha, beta]", "owners: [alpha]"))
    meta = merge(load_params(other), layout)
    assert meta["experts"] == ["public", "alpha"] and "withdrawn_removed" not in meta
    assert layout.expert("beta").is_dir() and layout.curated("beta").is_dir()


# ------------------------------------------------------------------------------ the functions alone
@pytest.fixture
def bare(tmp_path) -> Layout:
    """A project of two files: params.yaml listing alpha only, and a dvc.lock whose last merge had alpha,
    beta and a name no owner may have."""
    layout = Layout.at(tmp_path)
    layout.params.write_text("owners: [alpha]\n")
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "merge": {"cmd": "flexo merge", "params": {"params.yaml": {"owners": ["alpha", "beta", "../x"]}}},
        "curate@beta": {"cmd": "flexo curate --owner beta"}, "curate@alpha": {"cmd": "flexo curate --owner alpha"},
        "train_expert@beta": {"cmd": "flexo train-expert --owner beta"}}}))
    return layout


def test_read_lock_absent_broken_and_not_a_lock(tmp_path):
    assert read_lock(tmp_path) == {}
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: [unclosed\n")
    with pytest.raises(FlexoError, match="is not valid YAML"):
        read_lock(tmp_path)
    (tmp_path / "dvc.lock").write_text("stages: [merge]\n")
    with pytest.raises(FlexoError, match="not a DVC lock file"):
        read_lock(tmp_path)


def test_plan_reads_the_last_merge_from_dvc_lock_and_ignores_bad_names(bare, caplog):
    meta = {"kind": "merged", "experts": ["public", "alpha", "beta"]}
    bare.merged.mkdir(parents=True)
    (bare.merged / "flexo.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="flexo.owners"):
        plan = withdrawal_plan(load_params(bare.params), bare)
    assert plan.owners == ["beta"] and plan.merged_before == {"alpha", "beta"} and plan.source == "dvc.lock"
    assert any("'../x'" in r.getMessage() for r in caplog.records)  # never turned into a path


def test_plan_of_another_params_file_is_empty(bare, tmp_path_factory):
    other = tmp_path_factory.mktemp("other") / "params.yaml"
    other.write_text("owners: [gamma]\n")
    assert withdrawal_plan(load_params(other), bare).owners == []


def test_prune_removes_the_owners_traces_and_keeps_an_unmerged_package(bare):
    for path in (bare.curated("beta") / "train.jsonl", bare.heldout("beta") / "test.jsonl",
                 bare.router_embedding("beta"), bare.expert("beta") / "expert.json",
                 bare.curated("alpha") / "train.jsonl"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = prune_withdrawn(bare, Withdrawal(["beta"], merged_before={"alpha"}))
    assert removed == {"beta": ["data/curated/beta", "data/heldout/beta", "models/router/beta.safetensors"]}
    assert bare.expert("beta").is_dir() and bare.curated("alpha").is_dir()  # beta's package: no merge used it
    assert set(read_lock(bare.root)["stages"]) == {"merge", "curate@alpha"}
    # merged before: the package goes too
    assert prune_withdrawn(bare, Withdrawal(["beta"], merged_before={"beta"})) == {"beta": ["models/experts/beta"]}
