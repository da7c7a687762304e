"""Federated router tuning: owners ship only router-row changes computed on their own text; the centre
averages them; nothing else moves, and the opt-out guarantee is recorded honestly."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from flexo.errors import FlexoError
from flexo.layout import Layout
from flexo.modeling import load_model, read_meta
from flexo.params import load_params
from stages.merge import merge
from stages.router_tune import router_tune
from stages.router_update import router_update


@pytest.fixture
def project(tiny_project, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(tiny_project.root, root)
    layout = Layout.at(root)
    params = load_params(layout.params)
    params.router_tune.method = "federated"
    merge(params, layout)
    return params, layout


def test_owner_update_reads_only_its_data_and_ships_only_router_changes(project, monkeypatch):
    import stages.router_update as ru

    params, layout = project
    read = []
    real = ru.read_split
    monkeypatch.setattr(ru, "read_split", lambda lay, name, split: (read.append(name), real(lay, name, split))[1])
    info = router_update("alpha", params, layout)
    assert set(read) == {"alpha", "public"}
    delta = load_file(layout.router_update("alpha"))
    assert delta and all(k.endswith("mlp.gate.weight") for k in delta)
    assert info["delta_norm"] > 0 and info["steps"] == params.router_tune.steps


def test_centre_averages_the_updates_and_nothing_else_moves(project):
    params, layout = project
    for owner in params.owners:
        router_update(owner, params, layout)
    meta = router_tune(params, layout)
    assert meta["opt_out_guarantee"] == "rerun" and meta["router_tune"]["method"] == "federated"
    merged = load_model(layout.merged).state_dict()
    tuned = load_model(layout.merged_rt).state_dict()
    deltas = [load_file(layout.router_update(o)) for o in params.owners]
    for name, t in tuned.items():
        if name.endswith("mlp.gate.weight"):
            assert torch.allclose(t, merged[name] + sum(d[name] for d in deltas) / len(deltas), atol=1e-7), name
        else:
            assert torch.equal(t, merged[name]), name


def test_update_against_another_merge_is_refused(project):
    params, layout = project
    for owner in params.owners:
        router_update(owner, params, layout)
    merge(params, layout, top_k=1)  # a different merged model
    with pytest.raises(FlexoError, match="computed against another merged model"):
        router_tune(params, layout)


def test_opt_out_of_a_federated_model_says_a_rerun_is_needed(project, tmp_path):
    from stages.optout import opt_out

    params, layout = project
    for owner in params.owners:
        router_update(owner, params, layout)
    router_tune(params, layout)
    out = opt_out(layout.merged_rt, ["beta"], tmp_path / "no-beta")
    assert out.get("rerun_needed") or "rerun" in str(read_meta(tmp_path / "no-beta"))
