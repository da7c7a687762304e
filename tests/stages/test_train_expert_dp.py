"""train-expert with DP-SGD on the tiny project: the guarantee is recorded, the public parts stay
bit-identical, a killed run resumes to the same expert, a DP owner merges with a non-DP one and opts out."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from flexo.errors import FlexoError
from flexo.modeling import load_model, read_meta
from flexo.package import PACKAGE_TENSORS
from stages.train_expert import train_expert


def dp_on(params, owner="beta", epsilon=8.0):
    dp = params.train_expert.dp
    dp.epsilon, dp.delta, dp.owners, dp.documents_per_step = epsilon, 1e-3, [owner], 16
    params.train_expert.max_steps = 6  # of the 24 that 3 expected epochs at 16 of 127 documents would take
    params.train_expert.checkpoint_every = 2
    return params


def test_dp_expert_records_its_guarantee_and_keeps_the_public_parts(project_copy):
    layout, params = project_copy.layout, dp_on(project_copy.params)
    before = load_file(layout.expert("beta") / PACKAGE_TENSORS)
    meta = train_expert("beta", params, layout, resume=False)
    d = meta["dp"]
    assert 0 < d["epsilon"] <= 8.0 + 0.02 and d["delta"] == 1e-3 and d["noise_multiplier"] > 0.3
    assert d["documents"] > 50 and d["sample_rate"] == pytest.approx(16 / d["documents"], abs=1e-6)
    assert d["steps"] == meta["steps"] and meta["router"] == "trained-dp" and meta["train_loss"] is None
    assert "Poisson" in d["mechanism"] and "public_mix" in d["mechanism"]

    # every frozen tensor, expert 0 and r_pub bit-identical to the public model
    public = load_model(layout.public_model).state_dict()
    owner_model = load_model(layout.expert("beta") / "model").state_dict()
    for name, t in owner_model.items():
        ref = public[name]
        assert torch.equal(t[:1], ref) if t.shape != ref.shape else torch.equal(t, ref), name
    # the trainable part moved: expert 1's FFN and its router row (which started at r_pub)
    after = load_file(layout.expert("beta") / PACKAGE_TENSORS)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    gate = owner_model["model.layers.0.mlp.gate.weight"]
    assert not torch.equal(gate[1], gate[0])

    # a DP expert merges with a non-DP one; the card and flexo.json say which is DP; opting it out works
    from stages.merge import merge
    from stages.optout import opt_out

    merge(params, layout)
    merged = read_meta(layout.merged)
    assert set(merged["dp"]) == {"beta"} and merged["dp"]["beta"]["epsilon"] == d["epsilon"]
    card = (layout.merged / "README.md").read_text()
    assert "Differentially private experts" in card and "beta: (ε =" in card and "alpha" not in card.split(
        "Differentially private experts")[1].split(".")[0]
    out = layout.root / "models" / "no-beta"
    opt_out(layout.merged, ["beta"], out)
    assert read_meta(out)["experts"] == ["public", "alpha"] and "dp" not in read_meta(out)


def test_dp_training_resumes_to_the_same_expert(project_copy):
    layout, params = project_copy.layout, dp_on(project_copy.params)
    train_expert("beta", params, layout, resume=False)
    reference = load_file(layout.expert("beta") / PACKAGE_TENSORS)
    ref_meta = json.loads((layout.expert("beta") / "expert.json").read_text())
    shutil.rmtree(layout.expert("beta"))

    def crash(step):
        if step == 3:  # a checkpoint was written at step 2
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_expert("beta", params, layout, on_step=crash)
    assert json.loads((layout.checkpoints("expert-beta") / "state.json").read_text())["step"] == 2
    meta = train_expert("beta", params, layout)
    resumed = load_file(layout.expert("beta") / PACKAGE_TENSORS)
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    assert meta["dp"] == ref_meta["dp"]


def test_dp_refusals_are_one_line(project_copy):
    layout, params = project_copy.layout, dp_on(project_copy.params)
    params.train_expert.dp.delta = 0.5
    with pytest.raises(FlexoError, match=r"delta 0.5 is not below 1/\d+") as e:
        train_expert("beta", params, layout, resume=False)
    assert "\n" not in str(e.value)
    params.train_expert.dp.delta = 1e-3
    params.train_expert.dp.epsilon = 1e-3
    with pytest.raises(FlexoError, match="cannot be reached") as e:
        train_expert("beta", params, layout, resume=False)
    params.train_expert.dp.epsilon = 8.0
    params.train_expert.backend = "deepspeed"
    with pytest.raises(FlexoError, match="DeepSpeed backend has no DP-SGD"):
        train_expert("beta", params, layout, resume=False)
    # alpha is not listed in dp.owners: it trains as before, on any backend choice that works here
    params.train_expert.backend = "torch"
    assert "dp" not in train_expert("alpha", params, layout, resume=False)
    from flexo.params import params_from_dict

    with pytest.raises(FlexoError, match=r"train_expert.dp.owners names \['gamma'\]"):
        params_from_dict({"owners": ["alpha"], "train_expert": {"dp": {"owners": ["gamma"]}}})
