"""train-public, embed and train-expert: the coupled recipe's invariants, on the tiny project."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexo.errors import FlexoError
from flexo.fsutil import sha256_file
from flexo.modeling import fingerprint, read_meta, read_router_row
from flexo.package import PACKAGE_TENSORS, package_shapes
from stages.train_expert import train_expert


def test_public_model_is_stock_transformers_with_fingerprint(tiny_project):
    layout = tiny_project
    model = AutoModelForCausalLM.from_pretrained(layout.public_model)
    tok = AutoTokenizer.from_pretrained(layout.public_model)
    assert type(model).__name__ == "FlexOlmoForCausalLM" and model.config.num_experts == 1
    assert tok.pad_token_id != tok.eos_token_id
    meta = read_meta(layout.public_model)
    assert meta["fingerprint"] == fingerprint(layout.public_model)
    assert meta["training"]["val_loss"] < meta["training"]["initial_val_loss"] - 0.3
    # r_pub sits in the single router row of every layer
    r_pub = read_router_row(layout.router_embedding("public"), model.config.hidden_size)
    for layer in model.model.layers:
        assert torch.equal(layer.mlp.gate.weight[0], r_pub)


def test_router_embedding_is_projected_unit_norm_and_recorded(tiny_project):
    layout = tiny_project
    meta = json.loads(layout.router_embedding("alpha").with_suffix(".json").read_text())
    assert meta["embedder_dim"] == 384 and meta["model_dim"] == 32 and meta["projection"]["kind"] == "gaussian"
    rows = {n: read_router_row(layout.router_embedding(n), 32) for n in ("public", "alpha", "beta")}
    assert all(abs(float(r.norm()) - 1.0) < 1e-5 for r in rows.values())
    # domains differ: code vs arithmetic drills are further apart than either is from itself
    assert torch.dot(rows["alpha"], rows["beta"]) < 0.99


def test_every_frozen_tensor_is_bit_identical_to_the_public_model(tiny_project):
    layout = tiny_project
    public = AutoModelForCausalLM.from_pretrained(layout.public_model).state_dict()
    for owner in ("alpha", "beta"):
        own = AutoModelForCausalLM.from_pretrained(layout.expert(owner) / "model").state_dict()
        assert own.keys() == public.keys()
        for name, t in own.items():
            ref = public[name]
            if t.shape != ref.shape:  # the MoE tensors: index 0 is the public expert / r_pub
                assert torch.equal(t[:1], ref), name
                assert not torch.equal(t[1:], t[:1]) or "gate.weight" in name, f"{name}: expert 1 never trained"
            else:
                assert torch.equal(t, ref), name


def test_owner_model_beats_public_on_its_own_val_split(tiny_project):
    for owner in ("alpha", "beta"):
        meta = json.loads((tiny_project.expert(owner) / "expert.json").read_text())
        assert meta["val_loss"] < meta["initial_val_loss"], owner
        log = (tiny_project.expert(owner) / "loss.csv").read_text().splitlines()
        assert log[0] == "step,tokens,lr,train_loss,val_loss" and len(log) >= 3


def test_package_holds_only_the_owners_tensors(tiny_project):
    layout = tiny_project
    pkg = load_file(layout.expert("alpha") / PACKAGE_TENSORS)
    own = AutoModelForCausalLM.from_pretrained(layout.expert("alpha") / "model")
    assert {k: tuple(v.shape) for k, v in pkg.items()} == package_shapes(2, 32, 64)
    layer = own.model.layers[1].mlp
    assert torch.equal(pkg["layers.1.gate_proj"], layer.experts.gate_up_proj[1, :64])
    assert torch.equal(pkg["layers.1.up_proj"], layer.experts.gate_up_proj[1, 64:])
    assert torch.equal(pkg["layers.1.down_proj"], layer.experts.down_proj[1])
    assert torch.equal(pkg["layers.1.router"], layer.gate.weight[1])
    meta = json.loads((layout.expert("alpha") / "expert.json").read_text())
    assert meta["public_fingerprint"] == read_meta(layout.public_model)["fingerprint"]
    assert set(meta["data_manifest_sha256"]) == {"train", "val"}
    assert "text" not in json.dumps(meta)  # figures and hashes, never data


def test_resume_after_crash_gives_the_same_expert(project_copy):
    layout, params = project_copy.layout, project_copy.params
    reference = load_file(layout.expert("alpha") / PACKAGE_TENSORS)
    shutil.rmtree(layout.expert("alpha"))

    def crash(step):
        if step == 6:  # a checkpoint was written at step 4
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_expert("alpha", params, layout, on_step=crash)
    assert not layout.expert("alpha").exists()  # no half-written output
    assert json.loads((layout.checkpoints("expert-alpha") / "state.json").read_text())["step"] == 4
    meta = train_expert("alpha", params, layout)
    resumed = load_file(layout.expert("alpha") / PACKAGE_TENSORS)
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    assert not layout.checkpoints("expert-alpha").exists()
    assert meta["steps"] == params.train_expert.max_steps


def test_mismatched_public_fingerprint_is_refused(project_copy):
    layout, params = project_copy.layout, project_copy.params
    path = layout.public_model / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(FlexoError, match="fingerprint mismatch"):
        train_expert("alpha", params, layout)


def test_missing_router_embedding_names_the_stage_to_run(project_copy):
    layout, params = project_copy.layout, project_copy.params
    layout.router_embedding("beta").unlink()
    with pytest.raises(FlexoError, match="run `flexo embed --owner beta`"):
        train_expert("beta", params, layout)


def test_empty_split_names_the_fix(project_copy):
    layout, params = project_copy.layout, project_copy.params
    layout.split_file("beta", "val").write_text("")
    manifest_path = layout.curated("beta") / "manifest.json"  # as if curate had written the empty split
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"]["val"]["sha256"] = sha256_file(layout.split_file("beta", "val"))
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FlexoError, match="is empty"):
        train_expert("beta", params, layout)


def test_embedder_that_fails_to_load_is_one_line(project_copy, tmp_path):
    from stages.embed import embed

    layout, params = project_copy.layout, project_copy.params
    bad = tmp_path / "broken-embedder"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    params.embed.embedder = str(bad)
    with pytest.raises(FlexoError, match="failed to load") as e:
        embed("alpha", params, layout)
    assert "\n" not in str(e.value)


def test_classifier_router_rows_are_fitted_then_frozen(project_copy):
    """router: classifier — r_owner = r_pub + a logistic regression own-vs-public text, never trained."""
    from flexo.modeling import coupled_model, load_model
    from flexo.training import pack
    from flexo.data import read_split
    from stages.train_expert import set_classifier_rows
    from flexo.tokenization import load_tokenizer

    layout, params = project_copy.layout, project_copy.params
    assert params.train_expert.router == "classifier"
    meta = json.loads((layout.expert("alpha") / "expert.json").read_text())
    pkg = load_file(layout.expert("alpha") / PACKAGE_TENSORS)
    # Refit on a fresh coupled model: the same rows as the trained package, so training left them alone.
    public = load_model(layout.public_model)
    tok = load_tokenizer(layout)
    seq = params.model.max_seq_len
    fresh = coupled_model(public, torch.zeros(params.model.hidden_size))
    set_classifier_rows(fresh, public, pack(tok, read_split(layout, "alpha", "train"), seq, "a"),
                        pack(tok, read_split(layout, "public", "train"), seq, "p"), params.train_expert)
    for i, layer in enumerate(fresh.model.layers):
        assert torch.equal(pkg[f"layers.{i}.router"], layer.mlp.gate.weight[1]), i
    # A real classifier, even on this 30-step model: balanced accuracy well above chance (0.5).
    for fig in meta["router_classifier"]:
        assert (fig["own_recall"] + fig["public_recall"]) / 2 > 0.58, fig


def test_trained_router_rows_start_from_the_embedding_and_move(project_copy):
    layout, params = project_copy.layout, project_copy.params
    params.train_expert.router = "trained"
    train_expert("alpha", params, layout, resume=False)
    pkg = load_file(layout.expert("alpha") / PACKAGE_TENSORS)
    start = read_router_row(layout.router_embedding("alpha"), params.model.hidden_size)
    assert not torch.equal(pkg["layers.0.router"], start)
    assert json.loads((layout.expert("alpha") / "expert.json").read_text())["router"] == "trained"


def test_unscaled_router_embedding_is_the_raw_embedder_mean(project_copy):
    """embed.row_norm: 0 (the paper's recipe) writes the embedder mean itself as the router row."""
    from stages.embed import embed

    layout, params = project_copy.layout, project_copy.params
    params.embed.row_norm = 0.0
    params.model.hidden_size = 384  # the embedder's width: no projection (the demo's case)
    meta = embed("alpha", params, layout)
    tensors = load_file(layout.router_embedding("alpha"))
    assert meta["projection"] is None
    assert torch.equal(tensors["router_row"], tensors["embedder_mean"])
    assert abs(float(tensors["router_row"].norm()) - meta["row_norm"]) < 1e-4 and meta["row_norm"] != 1.0
