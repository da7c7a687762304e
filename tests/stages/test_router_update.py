"""Federated router tuning: owners ship only statistics of their model's router inputs on their own text;
the centre fits every router row from them; nothing else moves, and the opt-out guarantee is honest.
(The fit itself, on statistics alone, is tested in tests/flexo/test_router_fit.py.)"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_project
from flexo.errors import FlexoError
from flexo.modeling import load_model, read_meta
from flexo.router_fit import router_inputs
from stages.router_tune import router_tune
from stages.router_update import router_update


@pytest.fixture
def project(tiny_project, tmp_path):
    project = copy_project(tiny_project, tmp_path / "p", merged=True)
    project.params.router_tune.method = "federated"
    return project.params, project.layout


def test_owner_ships_statistics_of_its_own_text_only(project, monkeypatch):
    import stages.router_update as ru

    params, layout = project
    read = []
    real = ru.read_split
    monkeypatch.setattr(ru, "read_split", lambda lay, name, split: (read.append((name, split)), real(lay, name, split))[1])
    info = router_update("alpha", params, layout)
    assert read == [("alpha", "train")]
    stats = load_file(layout.router_update("alpha"))
    layers = params.model.num_layers
    width = params.model.hidden_size
    assert set(stats) == {"tokens"} | {f"layers.{i}.{k}" for i in range(layers) for k in ("mean", "cov")}
    assert stats["layers.0.cov"].shape == (width, width) and int(stats["tokens"]) == info["tokens"] >= 2048


def test_statistics_are_the_mean_and_covariance_of_the_router_inputs(project):
    params, layout = project
    router_update("beta", params, layout)
    stats = load_file(layout.router_update("beta"))
    # Recompute from the owner's own model on its own text: the same numbers.
    from transformers import AutoTokenizer

    from flexo.training import pack
    from flexo.data import read_split

    model = load_model(layout.expert("beta") / "model")
    tok = AutoTokenizer.from_pretrained(layout.expert("beta") / "model")
    blocks = pack(tok, read_split(layout, "beta", "train"), params.model.max_seq_len, "beta")
    h = router_inputs(model, blocks, max_blocks=params.router_tune.stats_blocks)[1].double()
    assert torch.allclose(stats["layers.1.mean"].double(), h.mean(0), atol=1e-4)
    centred = h - h.mean(0)
    assert torch.allclose(stats["layers.1.cov"].double(), centred.T @ centred / (len(h) - 1), atol=1e-3)


def test_centre_fits_router_rows_and_nothing_else_moves(project):
    params, layout = project
    for owner in params.owners:
        router_update(owner, params, layout)
    meta = router_tune(params, layout)
    assert meta["opt_out_guarantee"] == "rerun" and meta["router_tune"]["method"] == "federated"
    merged = load_model(layout.merged).state_dict()
    tuned = load_model(layout.merged_rt).state_dict()
    moved = 0
    for name, t in tuned.items():
        if name.endswith("mlp.gate.weight"):
            assert torch.equal(t[0], merged[name][0]), name  # r_pub is the public model's row
            moved += int(not torch.equal(t[1:], merged[name][1:]))
        else:
            assert torch.equal(t, merged[name]), name
    assert moved == params.model.num_layers


def test_statistics_from_another_public_model_are_refused(project):
    params, layout = project
    for owner in params.owners:
        router_update(owner, params, layout)
    path = layout.router_update("beta").with_suffix(".json")
    import json

    info = json.loads(path.read_text())
    path.write_text(json.dumps(dict(info, public_fingerprint="0" * 64)))
    with pytest.raises(FlexoError, match="another public model"):
        router_tune(params, layout)


def test_corrupt_statistics_are_refused(project):
    params, layout = project
    for owner in params.owners:
        router_update(owner, params, layout)
    stats = load_file(layout.router_update("alpha"))
    stats["layers.0.mean"][0] = float("nan")
    save_file(stats, str(layout.router_update("alpha")))
    with pytest.raises(FlexoError, match="NaN or Inf"):
        router_tune(params, layout)


def test_opt_out_of_a_federated_model_says_a_rerun_is_needed(project, tmp_path):
    from stages.optout import opt_out

    params, layout = project
    for owner in params.owners:
        router_update(owner, params, layout)
    router_tune(params, layout)
    out = opt_out(layout.merged_rt, ["beta"], tmp_path / "no-beta")
    assert out.get("rerun_needed") or "rerun" in str(read_meta(tmp_path / "no-beta"))


def test_missing_statistics_name_the_owner_stage_to_run(project):
    params, layout = project
    router_update("alpha", params, layout)  # beta's statistics never computed
    with pytest.raises(FlexoError, match="run `flexo router-update --owner beta`"):
        router_tune(params, layout)
    assert not layout.merged_rt.exists()
