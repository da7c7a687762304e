"""The DeepSpeed backend (flexo/ds_backend.py) on CPU, on the tiny project: ZeRO-2 keeps the public parts
bit-identical, learns, and gives the plain PyTorch loop's per-step losses.

Part of `make test`: on one CPU rank flexo skips DeepSpeed's shared-memory comm op, so nothing is
JIT-compiled (a fresh TORCH_EXTENSIONS_DIR stays empty: checked below).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil

import pytest
import torch

from flexo.params import PUBLIC

pytestmark = [
    pytest.mark.deepspeed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]


@pytest.fixture(autouse=True, scope="module")
def torch_extensions(tmp_path_factory):
    """An empty JIT-build folder for DeepSpeed: a single CPU rank must need no compiled op (a fresh CI
    machine would otherwise spend minutes compiling before the first step)."""
    folder = tmp_path_factory.mktemp("torch_extensions")
    before = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("TORCH_EXTENSIONS_DIR")
    else:
        os.environ["TORCH_EXTENSIONS_DIR"] = before
    assert not [p.name for p in folder.rglob("*.so")], "DeepSpeed JIT-compiled an op for a single CPU rank"


def owner_run(layout, params, owner, **overrides):
    """What `train_expert` hands to the training function, built from the stage's own pieces."""
    from flexo.modeling import coupled_model, read_router_row
    from flexo.training import Batches, pack
    from flexo.data import read_split
    from flexo.tokenization import load_tokenizer
    from stages.train_expert import load_public, owner_trainables

    tp = dataclasses.replace(params.train_expert, **overrides)
    tok = load_tokenizer(layout)
    public, _ = load_public(layout)
    model = coupled_model(public, read_router_row(layout.router_embedding(owner), public.config.hidden_size))
    trainable, masks = owner_trainables(model)
    seq = params.model.max_seq_len
    blocks = pack(tok, read_split(layout, owner, "train"), seq, "train")
    mix = pack(tok, read_split(layout, PUBLIC, "train"), seq, "public") if tp.public_mix else None
    return {
        "model": model, "public": public, "tp": tp,
        "args": (model, Batches(blocks, tp.batch_size, tp.seed, mix, tp.public_mix),
                 pack(tok, read_split(layout, owner, "val"), seq, "val"), tp),
        "kwargs": {"trainable": trainable, "grad_masks": masks, "key_parts": {"owner": owner}},
    }


def frozen_parts_equal(model, public) -> list[str]:
    pub = public.state_dict()
    moved = []
    for name, t in model.state_dict().items():
        ref = pub[name]
        same = torch.equal(t[:1], ref) if t.shape != ref.shape else torch.equal(t, ref)
        if not same:
            moved.append(name)
    return moved


def test_deepspeed_expert_keeps_public_parts_learns_and_matches_torch(project_copy, tmp_path):
    from flexo.ds_backend import select_backend, train_deepspeed
    from flexo.training import train

    layout, params = project_copy.layout, project_copy.params
    ds = owner_run(layout, params, "alpha", backend="deepspeed", eval_every=1)
    assert select_backend(ds["tp"]) is train_deepspeed
    ds_result = select_backend(ds["tp"])(*ds["args"], **ds["kwargs"], ckpt_dir=tmp_path / "ds", resume=False)
    ref = owner_run(layout, params, "alpha", backend="torch", eval_every=1)
    assert select_backend(ref["tp"]) is train
    ref_result = train(*ref["args"], **ref["kwargs"], ckpt_dir=tmp_path / "torch", resume=False)

    # (a) every frozen tensor, expert 0 and r_pub equal the public model's bit for bit; expert 1 trained
    assert frozen_parts_equal(ds["model"], ds["public"]) == []
    gate_up = ds["model"].model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(gate_up[1], gate_up[0])
    # back on the CPU as standalone tensors, not views into ZeRO's flat buffer (save_pretrained would take
    # views of one storage for tied weights and drop all but one)
    storages = [p.untyped_storage().data_ptr() for p in ds["model"].parameters()]
    assert len(set(storages)) == len(storages)
    assert {p.device.type for p in ds["model"].parameters()} == {"cpu"}
    # (b) it learns
    losses = [row["train_loss"] for row in ds_result.log[1:]]
    assert ds_result.val_loss < ds_result.initial_val_loss
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    # (c) the same rows, steps, batches and per-step losses as the plain PyTorch loop
    assert [(r["step"], r["tokens"], r["lr"]) for r in ds_result.log] == [(r["step"], r["tokens"], r["lr"]) for r in ref_result.log]
    ref_losses = [row["train_loss"] for row in ref_result.log[1:]]
    assert len(losses) == ds_result.steps == ref_result.steps
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-3, (losses, ref_losses)
    assert abs(ds_result.val_loss - ref_result.val_loss) < 1e-3
    for (name, a), b in zip(ds["model"].state_dict().items(), ref["model"].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-3), name


def test_zero2_reduces_only_masked_gradients(project_copy):
    """The mask hooks run before DeepSpeed's gradient hooks: ZeRO-2's own gradient partition holds zeros
    in the public slice (and, without the masks, the public slice would get a gradient)."""
    from deepspeed.utils import safe_get_full_grad

    from flexo.ds_backend import build_engine

    layout, params = project_copy.layout, project_copy.params
    run = owner_run(layout, params, "alpha", backend="deepspeed")
    model, batches, _, tp = run["args"]
    x = batches.batch(0)

    unmasked = owner_run(layout, params, "alpha")["model"]
    unmasked(input_ids=x, labels=x).loss.backward()
    assert unmasked.model.layers[0].mlp.experts.down_proj.grad[0].abs().sum() > 0  # the masks are what zero it

    engine, named, handles, _ = build_engine(model, run["kwargs"]["trainable"], run["kwargs"]["grad_masks"], set(), tp)
    try:
        engine.backward(engine(input_ids=x, labels=x).loss)
        for name, p in named.items():
            g = safe_get_full_grad(p)
            assert g is not None, name
            assert torch.count_nonzero(g[0]) == 0, f"{name}: the public slice reached ZeRO-2's gradient partition"
            assert torch.count_nonzero(g[1]) > 0, f"{name}: expert 1 got no gradient"
        engine.step()
    finally:
        engine.destroy()
        for h in handles:
            h.remove()
    assert frozen_parts_equal(model, run["public"]) == []


def test_resume_restores_weights_and_zero2_optimizer_state(project_copy, tmp_path):
    """A run killed after a checkpoint and resumed ends bit-identical to an uninterrupted run: the
    checkpoint (flexo's safetensors + JSON) holds the trainable weights, both AdamW moments and the step,
    exported from ZeRO-2's flat partitions per parameter. A checkpoint written by the torch backend resumes
    under DeepSpeed (same format)."""
    from flexo.ds_backend import train_deepspeed
    from flexo.training import train

    layout, params = project_copy.layout, project_copy.params
    overrides = {"backend": "auto", "checkpoint_every": 4}

    def crash(step):
        if step == 6:
            raise KeyboardInterrupt("simulated kill")

    def finish(fn, ckpt, on_step=None):
        run = owner_run(layout, params, "alpha", **overrides)
        result = fn(*run["args"], **run["kwargs"], ckpt_dir=ckpt, on_step=on_step)
        return result, run["model"].state_dict()

    _, reference = finish(train_deepspeed, tmp_path / "whole")
    for first in (train_deepspeed, train):
        ckpt = tmp_path / f"from-{first.__name__}"
        with pytest.raises(KeyboardInterrupt):
            finish(first, ckpt, crash)
        assert (ckpt / "state.json").is_file() and (ckpt / "optimizer.safetensors").is_file()
        result, resumed = finish(train_deepspeed, ckpt)
        assert result.resumed_from == 4
        for name, t in reference.items():
            if first is train_deepspeed:
                assert torch.equal(t, resumed[name]), name
            else:
                assert torch.allclose(t, resumed[name], atol=1e-4), name


def test_train_expert_stage_uses_the_deepspeed_backend(project_copy, monkeypatch):
    """`backend: deepspeed` in params.yaml reaches the stage (stages call `select_backend(tp)(...)`)."""
    import flexo.ds_backend as ds_backend
    from stages.train_expert import train_expert

    layout, params = project_copy.layout, project_copy.params
    calls = []
    real = ds_backend.train_deepspeed

    def spy(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ds_backend, "train_deepspeed", spy)
    params.train_expert = dataclasses.replace(params.train_expert, backend="deepspeed")
    shutil.rmtree(layout.expert("beta"))
    train_expert("beta", params, layout)  # runs the stage's own bit-identity check before writing
    assert len(calls) == 1
    assert (layout.expert("beta") / "expert.safetensors").is_file()
