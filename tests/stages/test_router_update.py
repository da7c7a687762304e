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
    assert set(stats) == {"tokens", "documents"} | {f"layers.{i}.{k}" for i in range(layers) for k in ("mean", "cov")}
    assert stats["layers.0.cov"].shape == (width, width) and int(stats["tokens"]) == info["tokens"] >= 2048


def test_statistics_are_the_mean_and_covariance_of_the_router_inputs(project):
    params, layout = project
    router_update("beta", params, layout)
    stats = load_file(layout.router_update("beta"))
    # Recompute from the owner's own model on its own documents, one at a time: the same numbers.
    from transformers import AutoTokenizer

    from flexo.data import read_split

    model = load_model(layout.expert("beta") / "model")
    tok = AutoTokenizer.from_pretrained(layout.expert("beta") / "model")
    rows = []
    for text in read_split(layout, "beta", "train")[: params.router_tune.stats_documents]:
        ids = [tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"][: params.model.max_seq_len]]
        rows.append(router_inputs(model, torch.tensor([ids]), max_blocks=1)[1][1:])  # the EOS prefix not counted
    h = torch.cat(rows).double()
    assert int(stats["tokens"]) == len(h)
    assert torch.allclose(stats["layers.1.mean"].double(), h.mean(0), atol=1e-4)
    centred = h - h.mean(0)
    assert torch.allclose(stats["layers.1.cov"].double(), centred.T @ centred / (len(h) - 1), atol=1e-3)


def test_centre_fits_router_rows_and_nothing_else_moves(project):
    params, layout = project
    for owner in params.owners:
        router_update(owner, params, layout)
    meta = router_tune(params, layout)
    assert meta["opt_out_guarantee"] == "refit" and meta["router_tune"]["method"] == "federated"
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


def test_opt_out_of_the_default_model_equals_merge_without_and_refit(project, tmp_path):
    """`flexo opt-out` and the server's per-request exclusion on models/merged-rt give the model that
    merging without the owner and rerunning router-tune gives (logits within 1e-6)."""
    import shutil

    import yaml

    from conftest import run_cli
    from flexo.serving import FlexoServer
    from stages.merge import merge

    params, layout = project
    for owner in params.owners:
        router_update(owner, params, layout)
    router_tune(params, layout)
    r = run_cli(["--root", str(layout.root), "opt-out", "--model", str(layout.merged_rt), "--exclude", "beta",
                 "--out", str(tmp_path / "no-beta")])
    assert r.rc == 0, r.err
    assert read_meta(tmp_path / "no-beta")["refitted_without"] == ["beta"]
    # Nothing of beta's is left in the opted-out model: not in its weights (only model tensors there), not
    # in the statistics it keeps for later refits.
    from flexo.refit import read_embedded
    from flexo.weights import read_header

    assert not [k for k in read_header(tmp_path / "no-beta" / "model.safetensors") if not k.startswith(("model.", "lm_head."))]
    assert list(read_embedded(tmp_path / "no-beta", expand=False)) == ["public", "alpha"]
    # the reference: beta withdrawn, merge and router-tune rerun from scratch in a copy of the project
    ref = tmp_path / "ref"
    shutil.copytree(layout.root, ref)
    raw = yaml.safe_load((ref / "params.yaml").read_text())
    raw["owners"] = ["alpha"]
    (ref / "params.yaml").write_text(yaml.safe_dump(raw))
    from flexo.project import Project

    ref_project = Project.open(ref)
    ref_project.params.router_tune.method = "federated"
    merge(ref_project.params, ref_project.layout)
    router_tune(ref_project.params, ref_project.layout)
    x = torch.randint(2, 400, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = load_model(ref_project.layout.merged_rt)(input_ids=x).logits
        got = load_model(tmp_path / "no-beta")(input_ids=x).logits
    assert (got - want).abs().max() <= 1e-6
    server, reference = FlexoServer(layout.merged_rt), FlexoServer(ref_project.layout.merged_rt)
    text = "Calculate 12 + 30. Answer: 42. The email module parses messages."
    assert abs(server.score(text, exclude=["beta"]) - reference.score(text)) <= 1e-4
    masked_only = server.score(text, exclude=["beta"]) != FlexoServer(layout.merged).score(text, exclude=["beta"])
    assert masked_only  # the refit matters: the default model is not the plain merge
    assert server.respond("Calculate 3 + 4.", exclude=["beta"], max_new_tokens=8).text == \
        reference.respond("Calculate 3 + 4.", max_new_tokens=8).text
    # router-tune stored each single owner's refit beside the model: the same rows as refitting now
    from flexo.refit import read_embedded, read_refit, refit
    from flexo.routers import routers

    meta = read_meta(layout.merged_rt)
    r_pub = [g.weight[0].detach().clone() for g in routers(load_model(layout.merged_rt))]
    stored = read_refit(layout.merged_rt, "beta", len(r_pub))
    fresh = refit(read_embedded(layout.merged_rt), meta["experts"], ["beta"], meta["router_tune"], r_pub)
    assert stored is not None and all(torch.equal(a, b) for a, b in zip(stored, fresh))


def test_private_low_rank_statistics_ship_r_times_h_and_state_their_budget(project):
    import json

    params, layout = project
    params.router_tune.dp_epsilon, params.router_tune.stats_rank = 1.0, 4
    # A fixed noise key, so that this test sees the same noise on every machine (flexo makes a random one).
    (layout.root / ".cache").mkdir(exist_ok=True)
    (layout.root / ".cache" / "dp-secret").write_bytes(bytes(range(32)))
    info = router_update("alpha", params, layout)
    stats = load_file(layout.router_update("alpha"))
    width = params.model.hidden_size
    assert stats["layers.0.eigvecs"].shape == (4, width) and "layers.0.cov" not in stats
    assert info["numbers_shipped"] < width * width  # r·h, not h², a layer
    dp = json.loads(layout.router_update("alpha").with_suffix(".json").read_text())["dp"]
    assert dp["epsilon"] == pytest.approx(1.0, rel=1e-3) and dp["delta"] == 1e-5 and dp["noise_multiplier"] > 1
    assert (layout.root / ".cache" / "dp-secret").is_file()  # the noise key stays on the owner's machine
    again = router_update("alpha", params, layout)  # the same secret: the same bytes on a rerun
    assert again == info and torch.equal(load_file(layout.router_update("alpha"))["layers.0.mean"], stats["layers.0.mean"])
    router_update("beta", params, layout)
    meta = router_tune(params, layout)  # the centre fits from them, and records each owner's budget
    assert meta["router_tune"]["statistics"]["alpha"]["dp"]["epsilon"] == pytest.approx(1.0, rel=1e-3)
    # The tuned model keeps them as shipped (rank r, not expanded to h×h), and expands them as the fit did.
    from flexo.refit import read_embedded
    from flexo.router_stats import dense

    kept = read_embedded(layout.merged_rt, expand=False)
    assert torch.equal(kept["alpha"]["layers.0.eigvecs"], stats["layers.0.eigvecs"]) and "layers.0.cov" not in kept["alpha"]
    assert torch.equal(read_embedded(layout.merged_rt)["alpha"]["layers.0.cov"], dense(stats, params.model.num_layers)["layers.0.cov"])


@pytest.mark.parametrize("edit, words", [
    (dict(dp_epsilon=1.0, dp_delta=0.5), "dp_delta 0.5 must be above 0 and below 1/documents"),
    (dict(dp_epsilon=1e-9), "dp_epsilon 1e-09 cannot be met"),
    (dict(stats_rank=10_000), "stats_rank 10000 must be below the model width"),
    (dict(stats_documents=2), "tokens for router statistics, at least"),
])
def test_statistics_that_cannot_be_made_are_refused_in_one_line(project, edit, words):
    params, layout = project
    for k, v in edit.items():
        setattr(params.router_tune, k, v)
    with pytest.raises(FlexoError, match=words):
        router_update("alpha", params, layout)
    assert not layout.router_update("alpha").exists()


def test_missing_statistics_name_the_owner_stage_to_run(project):
    params, layout = project
    router_update("alpha", params, layout)  # beta's statistics never computed
    with pytest.raises(FlexoError, match="run `flexo router-update --owner beta`"):
        router_tune(params, layout)
    assert not layout.merged_rt.exists()
