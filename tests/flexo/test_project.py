"""flexo.project: a command's project — its root, its checked parameters (ROOT/params.yaml or another
file) — and `stage_command`, the one way a stage adds its subcommand."""

from __future__ import annotations

import argparse

import pytest

from conftest import TINY_PARAMS
from flexo.errors import FlexoError
from flexo.layout import Layout
from flexo.project import Project, stage_command


@pytest.fixture
def root(tmp_path):
    (tmp_path / "params.yaml").write_text(TINY_PARAMS)
    return tmp_path


def test_open_reads_root_params_yaml_and_resolves_the_root(root, monkeypatch):
    monkeypatch.chdir(root)
    project = Project.open()
    assert project.root == root.resolve() and project.layout == Layout.at(root)
    assert project.params_file == project.layout.params
    assert project.params.owners == ["alpha", "beta"] and project.params.model.hidden_size == 32


def test_open_with_another_params_file(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "alpha-only.yaml"
    other.write_text(TINY_PARAMS.replace("owners: [alpha, beta]", "owners: [alpha]"))
    project = Project.open(root, other)
    assert project.params.owners == ["alpha"] and project.params_file == other and project.root == root.resolve()


def test_bad_or_missing_params_are_flexo_errors(root, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FlexoError, match="params file .*params.yaml not found"):
        Project.open(empty)
    (root / "params.yaml").write_text(TINY_PARAMS.replace("merge: {top_k: 2}", "merge: {top_kk: 2}"))
    with pytest.raises(FlexoError, match="merge.top_kk"):
        Project.open(root)


def test_from_args_uses_the_global_options(root):
    project = Project.from_args(argparse.Namespace(root=str(root), params=None))
    assert project.root == root.resolve() and project.params.owners == ["alpha", "beta"]


def test_stage_command_opens_the_project_and_takes_an_owner(root):
    calls = []
    parser = argparse.ArgumentParser(prog="flexo")
    parser.add_argument("--root", default=".")
    parser.add_argument("--params", default=None)
    sub = parser.add_subparsers(dest="command")
    p = stage_command(sub, "do-it", "does it", lambda args, project: calls.append((args.owner, project)) or "done",
                      owner="whose data")
    assert p.description == "does it"
    stage_command(sub, "plain", "no owner", lambda args, project: project.params.owners)

    args = parser.parse_args(["--root", str(root), "do-it", "--owner", "beta"])
    assert args.run(args) == "done"
    owner, project = calls[0]
    assert owner == "beta" and isinstance(project, Project) and project.root == root.resolve()
    args = parser.parse_args(["--root", str(root), "plain"])
    assert args.run(args) == ["alpha", "beta"] and not hasattr(args, "owner")
    with pytest.raises(SystemExit) as e:  # --owner is required where a stage declares it
        parser.parse_args(["--root", str(root), "do-it"])
    assert e.value.code == 2
