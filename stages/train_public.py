"""Stage `train-public`: the public model — a 1-expert FlexOlmo (i.e. a dense OLMo-2 style model)
trained on the public train split, or converted from an existing checkpoint (`model.init_from`).

    flexo train-public

Writes `models/public/` (transformers model + tokenizer + `flexo.json` with the `fingerprint` that
every later stage checks) and `models/public/loss.csv`. The router row of its single expert is set to
r_pub (`models/router/public.safetensors`): with one expert the softmax gate is 1 whatever the row, so
the function is unchanged, and the merge takes r_pub from here like every other public weight.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import safe_open

from flexo.errors import FlexoError
from flexo.fsutil import atomic_dir
from flexo.layout import Layout
from flexo.modeling import (
    count_params, fingerprint, load_config, model_config, model_guard, new_model, read_router_row, write_meta,
)
from flexo import timings
from flexo.params import PUBLIC, Params
from flexo.project import stage_command
from flexo.ds_backend import select_backend
from flexo.training import Batches, drop_checkpoint, pack, write_loss_log
from flexo.data import read_split
from flexo.tokenization import load_tokenizer


def convert_checkpoint(path: Path, params: Params, tokenizer) -> torch.nn.Module:
    """A dense OLMo-2 or a FlexOlmo checkpoint → our 1-expert FlexOlmo (expert 0 of a FlexOlmo is its
    public expert). Reads safetensors only."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FlexoError(f"model.init_from {path} is not a transformers checkpoint folder (no config.json)")
    src_cfg = load_config(path, flex_olmo=False)
    if src_cfg.model_type not in ("olmo2", "flex_olmo"):
        raise FlexoError(f"model.init_from {path}: model_type {src_cfg.model_type!r} is not olmo2 or flex_olmo")
    if src_cfg.vocab_size < len(tokenizer):
        raise FlexoError(f"model.init_from {path}: vocab {src_cfg.vocab_size} is smaller than the tokenizer's")
    cfg = model_config(params.model, vocab_size=src_cfg.vocab_size, pad_id=tokenizer.pad_token_id,
                       eos_id=tokenizer.eos_token_id)
    for ours, theirs in [("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
                         ("num_hidden_layers", "num_hidden_layers"), ("num_attention_heads", "num_attention_heads"),
                         ("num_key_value_heads", "num_key_value_heads"), ("rms_norm_eps", "rms_norm_eps")]:
        setattr(cfg, ours, getattr(src_cfg, theirs))
    # Dense and 1-expert FlexOlmo agree bit for bit only when rms_norm_eps and rope_theta match (SPEC §1).
    cfg.rope_parameters = dict(getattr(src_cfg, "rope_parameters", None) or cfg.rope_parameters)
    model = new_model(cfg)
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    if not tensors:
        raise FlexoError(f"model.init_from {path} holds no .safetensors weights (pickle checkpoints are refused)")
    state = model.state_dict()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        if src_cfg.model_type == "olmo2":
            gate, up, down = (tensors.pop(p + f"{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
        else:
            gate, up, down = (tensors.pop(p + f"experts.0.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
            for k in [k for k in tensors if k.startswith(p)]:
                tensors.pop(k)  # the other experts and the router are not part of the public model
        tensors[p + "experts.gate_up_proj"] = torch.cat([gate, up], 0)[None]
        tensors[p + "experts.down_proj"] = down[None]
        tensors[p + "gate.weight"] = state[p + "gate.weight"]
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing = set(state) - set(tensors)
    if missing:
        raise FlexoError(f"model.init_from {path}: tensors missing for {sorted(missing)[0]} (and {len(missing) - 1} more)")
    model.load_state_dict({k: tensors[k].to(torch.float32) for k in state}, strict=True)
    return model


def train_public(params: Params, layout: Layout, *, resume: bool = True) -> dict:
    started = time.time()
    guard = model_guard("public", "public model", "flexo train-public")
    guard.check(layout.public_model)  # before the training, not only before the rename
    tokenizer = load_tokenizer(layout)
    r_pub = read_router_row(layout.router_embedding(PUBLIC), params.model.hidden_size)
    tp = params.train_public
    if params.model.init_from:
        model = convert_checkpoint(Path(params.model.init_from), params, tokenizer)
        result = None
    else:
        torch.manual_seed(tp.seed)
        cfg = model_config(params.model, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                           eos_id=tokenizer.eos_token_id)
        model = new_model(cfg)
        seq = params.model.max_seq_len
        train_blocks = pack(tokenizer, read_split(layout, PUBLIC, "train"), seq, "public train split")
        val_blocks = pack(tokenizer, read_split(layout, PUBLIC, "val"), seq, "public val split")
        trainable = {n: p for n, p in model.named_parameters()}
        # The single router row gets no gradient (softmax over one logit is 1); keep AdamW's decay off it.
        no_decay = {n for n in trainable if n.endswith("mlp.gate.weight")}
        result = select_backend(tp)(model, Batches(train_blocks, tp.batch_size, tp.seed), val_blocks, tp, trainable=trainable,
                       no_decay=no_decay, ckpt_dir=layout.checkpoints(PUBLIC), desc="train-public",
                       key_parts={"stage": "train_public", "model": vars(params.model), "data": len(train_blocks)},
                       resume=resume)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.copy_(r_pub[None])
    with atomic_dir(layout.public_model, guard) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "kind": "public",
            "experts": [PUBLIC],
            "fingerprint": fingerprint(tmp),
            "parameters": count_params(model),
            "init_from": params.model.init_from or None,
            "training": result.summary() if result else None,
        }
        write_meta(tmp, meta)
        if result:
            write_loss_log(tmp / "loss.csv", result.log)
    drop_checkpoint(layout.checkpoints(PUBLIC))
    timings.record(layout.root, "train-public", wall_s=round(time.time() - started, 1),
                   training=result.speed() if result else None)
    return meta


def add_cli(sub) -> None:
    p = stage_command(sub, "train-public", "train (or convert) the public model",
                      lambda args, project: train_public(project.params, project.layout, resume=not args.no_resume))
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint left by an interrupted run")
