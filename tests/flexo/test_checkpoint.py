"""Starting from a real checkpoint (flexo/checkpoint.py, `model.init_from`): tiny random `Olmo2ForCausalLM`
and `FlexOlmoForCausalLM` checkpoints with their own tokenizer (real architectures, tiny shapes), converted
by the stages and checked against the source models; then a whole owner → merge → evaluate run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FlexOlmoForCausalLM, Olmo2ForCausalLM

from flexo.errors import FlexoError
from flexo.layout import Layout
from flexo.modeling import load_model, read_meta
from flexo.params import load_params
from flexo.routers import runtime_opt_out
from flexo.weights import read_header
from conftest import TINY_PARAMS, VOCAB, make_tiny_project, public_documents, write_checkpoint

MODEL_PARAMS = ("model: {init_from: %s, hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 48, "
                "max_seq_len: 64, rms_norm_eps: 1.0e-5, rope_theta: 10000.0}")


def project_from(root: Path, checkpoint: Path, extra: str = "") -> Layout:
    """The tests' tiny project (2 owners) with the checkpoint as its public model."""
    make_tiny_project(root)
    text = TINY_PARAMS.replace(
        "model: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_seq_len: 64}",
        MODEL_PARAMS % checkpoint)
    assert text != TINY_PARAMS
    (root / "params.yaml").write_text(text + extra)
    return Layout.at(root)


def build_public(layout: Layout):
    from stages.curate import curate
    from stages.embed import embed
    from stages.tokenizer import train_tokenizer
    from stages.train_public import train_public

    params = load_params(layout.params)
    curate("public", params, layout, documents=public_documents())
    train_tokenizer(params, layout)
    embed("public", params, layout)
    return params, train_public(params, layout)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(3, 600, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A bf16 OLMo-2 checkpoint and a project whose public model is converted from it."""
    base = tmp_path_factory.mktemp("dense")
    ckpt = write_checkpoint(base / "olmo2", "olmo2", torch.bfloat16)
    layout = project_from(base / "project", ckpt)
    params, meta = build_public(layout)
    return ckpt, layout, params, meta


def test_dense_olmo2_converts_to_the_same_function(dense):
    """The converted bf16 model (loaded in fp32, as the stages load it) computes the checkpoint's function."""
    ckpt, layout, _, _ = dense
    source = Olmo2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours = load_model(layout.public_model)
    assert ours.config.num_experts == 1 and ours.config.vocab_size == VOCAB
    assert (logits(ours, IDS) - logits(source, IDS)).abs().max() <= 1e-5


def test_the_checkpoint_tokenizer_is_used_everywhere(dense):
    ckpt, layout, params, meta = dense
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(ckpt)
    ours = AutoTokenizer.from_pretrained(layout.tokenizer)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert (ours.eos_token, ours.pad_token) == ("</s>", "<pad>")
    manifest = json.loads((layout.tokenizer / "manifest.json").read_text())
    assert manifest["from_checkpoint"] == str(ckpt) and "trained_on" not in manifest
    text = "The owner's documents are tokenised with the checkpoint's ids."
    assert AutoTokenizer.from_pretrained(layout.public_model)(text)["input_ids"] == theirs(text)["input_ids"]


def test_conversion_keeps_the_dtype_and_the_bytes(dense):
    ckpt, layout, params, meta = dense
    src = load_file(ckpt / "model.safetensors")
    out = {}
    for f in layout.public_model.glob("*.safetensors"):
        out.update(load_file(f))
    assert {t.dtype for t in out.values()} == {torch.bfloat16}  # nothing upcast
    for i in range(2):
        for part in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(out[f"model.layers.{i}.mlp.experts.0.{part}.weight"], src[f"model.layers.{i}.mlp.{part}.weight"])
        assert out[f"model.layers.{i}.mlp.gate.weight"].shape == (1, 32)
    shared = [k for k in src if ".mlp." not in k]
    assert shared and all(torch.equal(out[k], src[k]) for k in shared)
    assert meta["parameters"] == sum(t.numel() for t in out.values())
    assert read_meta(layout.public_model)["init_from"] == str(ckpt)


def test_flexolmo_converts_to_its_public_expert(tmp_path):
    ckpt = write_checkpoint(tmp_path / "flex", "flex_olmo")
    layout = project_from(tmp_path / "project", ckpt)
    build_public(layout)
    source = FlexOlmoForCausalLM.from_pretrained(ckpt, experts_implementation="eager").eval()
    ours = load_model(layout.public_model)
    full = logits(source, IDS)
    with runtime_opt_out(source, ["public", "a", "b"], ["a", "b"]):
        masked = logits(source, IDS)
    assert (logits(ours, IDS) - masked).abs().max() <= 1e-5
    assert (full - masked).abs().max() > 1e-3  # the other experts did matter: the mask is what matched


@pytest.mark.parametrize("case, expected", [
    ("rope", "its rope_theta is 500000.0 but params.yaml has model.rope_theta: 10000.0: set model.rope_theta: 500000.0"),
    ("eps", "its rms_norm_eps is 1e-06 but params.yaml has model.rms_norm_eps: 1e-05: set model.rms_norm_eps: 1e-06"),
    ("width", "its hidden_size is 64 but params.yaml has model.hidden_size: 32: set model.hidden_size: 64"),
    ("vocab", "its tokenizer has 600 tokens but the embedding only 500 rows: the tokenizer is not this model's"),
    ("pickle", "holds no .safetensors weights (pickle checkpoints such as pytorch_model.bin are refused)"),
    ("llama", "model_type 'llama' is not olmo2 or flex_olmo"),
    ("experts", "layer 1: expert 2's FFN is [(40, 32), (40, 32), (32, 40)], expert 0's [(48, 32), (48, 32), (32, 48)]"),
    ("seq", "model.max_seq_len 64 is beyond its max_position_embeddings 32: lower model.max_seq_len"),
])
def test_mismatches_are_one_line_before_anything_is_written(tmp_path, case, expected):
    kind = "flex_olmo" if case == "experts" else "olmo2"
    config = {"rope": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
              "eps": {"rms_norm_eps": 1e-6}, "width": {"hidden_size": 64, "num_attention_heads": 4},
              "seq": {"max_position_embeddings": 32}}.get(case, {})
    ckpt = write_checkpoint(tmp_path / "ckpt", kind, **config)
    if case == "vocab":
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["vocab_size"] = 500
        (ckpt / "config.json").write_text(json.dumps(cfg))
        tensors = load_file(ckpt / "model.safetensors")
        tensors = {k: (v[:500].clone() if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in tensors.items()}
        save_file(tensors, ckpt / "model.safetensors")
    elif case == "pickle":
        torch.save({}, ckpt / "pytorch_model.bin")
        (ckpt / "model.safetensors").unlink()
    elif case == "llama":
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    elif case == "experts":  # expert 2 of layer 1 narrower than the others
        tensors = load_file(ckpt / "model.safetensors")
        for part in ("gate_proj", "up_proj"):
            k = f"model.layers.1.mlp.experts.2.{part}.weight"
            tensors[k] = tensors[k][:40].clone()
        k = "model.layers.1.mlp.experts.2.down_proj.weight"
        tensors[k] = tensors[k][:, :40].clone()
        save_file(tensors, ckpt / "model.safetensors")
    layout = project_from(tmp_path / "project", ckpt)
    from stages.curate import curate
    from stages.tokenizer import train_tokenizer

    params = load_params(layout.params)
    curate("public", params, layout, documents=public_documents())
    with pytest.raises(FlexoError) as err:
        train_tokenizer(params, layout)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model.init_from {ckpt}: ")
    assert expected in message
    assert not layout.tokenizer.exists()


def test_a_tokenizer_that_is_not_the_checkpoints_is_refused(dense, tmp_path):
    """models/tokenizer left by flexo's BPE (init_from set afterwards, the tokenizer stage not rerun)."""
    import shutil

    from stages.tokenizer import train_tokenizer
    from stages.train_public import train_public

    ckpt, layout, params, _ = dense
    root = tmp_path / "p"
    shutil.copytree(layout.root, root, ignore=shutil.ignore_patterns("models"))
    copy = Layout.at(root)
    (root / "models" / "router").mkdir(parents=True)
    shutil.copy2(layout.router_embedding("public"), copy.router_embedding("public"))
    bpe_params = load_params(root / "params.yaml")
    bpe_params.model.init_from = ""
    train_tokenizer(bpe_params, copy)
    with pytest.raises(FlexoError, match=r"^models/tokenizer is not the tokenizer of model.init_from .*: rerun "
                                         r"`flexo tokenizer`"):
        train_public(load_params(root / "params.yaml"), copy)
    assert not copy.public_model.exists()


def test_owner_merge_evaluate_from_a_checkpoint(dense):
    """The whole pipeline on the converted bf16 public model: the owners' data counted and trained with the
    checkpoint's tokenizer, experts written in bf16, merged, scored and evaluated."""
    from flexo.tokenization import count_tokens, load_tokenizer
    from flexo.data import read_split
    from stages.curate import curate
    from stages.embed import embed
    from stages.evaluate import evaluate
    from stages.merge import merge
    from stages.score import score
    from stages.train_expert import train_expert

    ckpt, layout, params, _ = dense
    tok = load_tokenizer(layout)
    for owner in params.owners:
        manifest = curate(owner, params, layout)
        assert manifest["splits"]["train"]["tokens"] == count_tokens(tok, read_split(layout, owner, "train"))
        embed(owner, params, layout)
        train_expert(owner, params, layout)
        header = read_header(layout.expert(owner) / "expert.safetensors")
        assert {e.dtype for e in header.values()} == {"BF16"}
    merge(params, layout)
    merged = load_model(layout.merged)
    assert merged.config.num_experts == 3
    # with both owners masked the merged model is the converted checkpoint (bf16 weights, exactly)
    with runtime_opt_out(merged, read_meta(layout.merged)["experts"], list(params.owners)):
        masked = logits(merged, IDS)
    source = Olmo2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert (masked - logits(source, IDS)).abs().max() <= 1e-5
    for owner in params.owners:
        score(owner, params, layout, limit=2)
    metrics = evaluate(params, layout, limit=2)
    bpb = metrics["bpb"]
    assert all(0 < bpb[m][d] < 20 for m in ("public", "flexolmo", "btm") for d in ("public", *params.owners))
