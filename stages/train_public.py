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

from flexo.checkpoint import read_source, source_tokenizer, write_public_model
from flexo.errors import FlexoError
from flexo.fsutil import atomic_dir
from flexo.layout import Layout
from flexo.modeling import (
    TORCH_DTYPES, count_params, fingerprint, model_config, model_guard, new_model, read_router_row, write_meta,
)
from flexo import timings
from flexo.params import PUBLIC, Params
from flexo.project import stage_command
from flexo.ds_backend import select_backend
from flexo.training import Batches, drop_checkpoint, pack, write_loss_log
from flexo.data import read_split
from flexo.tokenization import load_tokenizer


def convert_public(params: Params, tokenizer, r_pub: torch.Tensor, folder: Path) -> int:
    """`model.init_from` written into `folder` as the public model (flexo/checkpoint.py): streamed tensor by
    tensor in the checkpoint's dtype. `models/tokenizer` must be the checkpoint's own (the tokenizer stage
    installs it): weights read with another vocabulary would be read with the wrong token ids."""
    source = read_source(params)
    theirs = source_tokenizer(source)
    if tokenizer.backend_tokenizer.to_str() != theirs.backend_tokenizer.to_str():
        raise FlexoError(f"models/tokenizer is not the tokenizer of model.init_from {source.path}: rerun "
                         "`flexo tokenizer` (it installs the checkpoint's tokenizer when model.init_from is set)")
    row = r_pub.to(TORCH_DTYPES[source.dtype]).contiguous().view(torch.uint8).numpy()
    return write_public_model(source, row, folder, params.merge.shard_bytes)


def train_public(params: Params, layout: Layout, *, resume: bool = True) -> dict:
    started = time.time()
    guard = model_guard("public", "public model", "flexo train-public")
    guard.check(layout.public_model)  # before the training, not only before the rename
    tokenizer = load_tokenizer(layout)
    r_pub = read_router_row(layout.router_embedding(PUBLIC), params.model.hidden_size)
    tp = params.train_public
    result = None
    if not params.model.init_from:
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
        if params.model.init_from:
            parameters = convert_public(params, tokenizer, r_pub, tmp)
        else:
            model.save_pretrained(tmp)
            parameters = count_params(model)
        tokenizer.save_pretrained(tmp)
        meta = {
            "kind": "public",
            "experts": [PUBLIC],
            "fingerprint": fingerprint(tmp),
            "parameters": parameters,
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
