"""Federated router tuning: the owner's half (`flexo router-update --owner X`) and the centre's half
(`combine_updates`, run by `flexo router-tune` when `router_tune.method: federated`).

The merged model's weak spot is routing between owners: each owner's router row was trained only
against r_pub, never against the other owners' experts, so an expert can win tokens of a domain it
never saw (SPEC §4). Router tuning on public proxy data cannot fix that when the public mix has nothing
code- or math-like. Here each owner, in its own stage, runs router-only updates of the merged model on
its own text (plus `public_mix` public text) and ships only the change of the router rows — never
text. The centre averages the changes (FedAvg). An owner's data thus shapes every row a little (its own up, the
others down on its kind of text), so the tuned model's opt-out guarantee is "rerun": withdrawing an
owner reruns the merge, every remaining owner's update (they were computed against its expert) and
the combination — which DVC does by itself, since those stages depend on the merged model.
"""

from __future__ import annotations

import hashlib
import json
import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexo.errors import FlexoError
from flexo.fsutil import atomic_dir, atomic_path, read_json, write_json
from flexo.layout import Layout
from flexo.modeling import load_model, read_meta, write_meta
from flexo.params import PUBLIC, Params
from flexo.training import Batches, drop_checkpoint, pack, train
from stages.curate import read_split
from stages.router_tune import ROUTER_SUFFIX, _tune_train_params, router_params
from stages.merge import copy_support_files, write_model_card

GUARANTEE_NOTE = ("every owner's text shaped all router rows (federated router tuning): withdrawing an owner "
                  "reruns merge, router_update@<each owner> and router_tune; `dvc repro` does this when the "
                  "owner is removed from params.yaml")


def merged_id(meta: dict) -> str:
    """Identifies the merged model an update was computed against (its experts, packages and top-k)."""
    key = {k: meta.get(k) for k in ("experts", "packages", "top_k", "fingerprint")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def router_update(owner: str, params: Params, layout: Layout) -> dict:
    """Train the merged model's router rows on this owner's text; write only their change."""
    params.check_owner(owner)
    started = time.time()
    meta = read_meta(layout.merged)
    out = layout.router_update(owner)
    info = {"owner": owner, "merged_id": merged_id(meta), "experts": meta.get("experts"),
            "method": params.router_tune.method}
    if params.router_tune.method != "federated":
        # Keep the DVC output present but empty: the centre tunes another way (or not at all).
        with atomic_path(out) as tmp:
            save_file({}, str(tmp), metadata={"owner": owner, "skipped": "true"})
        write_json(out.with_suffix(".json"), dict(info, skipped=True))
        return dict(info, skipped=True)
    if owner not in (meta.get("experts") or []):
        raise FlexoError(f"owner {owner!r} is not in the merged model {layout.merged} "
                         f"(experts {meta.get('experts')}): rerun `flexo merge` first")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(layout.merged)
    seq = params.model.max_seq_len
    own = pack(tokenizer, read_split(layout, owner, "train"), seq, f"{owner} train split")
    val = pack(tokenizer, read_split(layout, owner, "val"), seq, f"{owner} val split")
    rt = params.router_tune
    mix = pack(tokenizer, read_split(layout, PUBLIC, "train"), seq, "public train split") if rt.public_mix else None
    model = load_model(layout.merged)
    trainable = router_params(model)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    tp = _tune_train_params(params)
    result = train(model, Batches(own, tp.batch_size, tp.seed, mix, rt.public_mix), val, tp, trainable=trainable,
                   ckpt_dir=layout.checkpoints(f"router-update-{owner}"), desc=f"router-update {owner}",
                   key_parts={"stage": "router_update", "owner": owner, "merged": info["merged_id"]})
    delta = {n: (p.detach() - before[n]).contiguous() for n, p in trainable.items()}
    info.update({"steps": result.steps, "tokens_seen": result.tokens, "public_mix": rt.public_mix,
                 "initial_val_loss": round(result.initial_val_loss, 5), "val_loss": round(result.val_loss, 5),
                 "delta_norm": round(float(sum(d.norm() ** 2 for d in delta.values()) ** 0.5), 6),
                 "wall_s": round(time.time() - started, 1)})
    with atomic_path(out) as tmp:
        save_file(delta, str(tmp), metadata={"owner": owner, "merged_id": info["merged_id"]})
    write_json(out.with_suffix(".json"), info)
    drop_checkpoint(layout.checkpoints(f"router-update-{owner}"))
    return info


def read_update(layout: Layout, owner: str, expected_id: str) -> dict[str, torch.Tensor]:
    path = layout.router_update(owner)
    info = read_json(path.with_suffix(".json"), what="router update manifest")
    if info.get("skipped"):
        raise FlexoError(f"the router update of {owner!r} was skipped (method {info.get('method')}): rerun "
                         f"`flexo router-update --owner {owner}` with router_tune.method: federated")
    if info.get("merged_id") != expected_id:
        raise FlexoError(f"the router update of {owner!r} was computed against another merged model: rerun "
                         f"`flexo router-update --owner {owner}`")
    try:
        delta = load_file(path)
    except (SafetensorError, OSError) as e:
        raise FlexoError(f"router update {path} is unreadable ({e}): rerun `flexo router-update --owner {owner}`") from None
    if any(not torch.isfinite(t).all() for t in delta.values()):
        raise FlexoError(f"router update {path} holds NaN or Inf: rerun `flexo router-update --owner {owner}`")
    return delta


def combine_updates(params: Params, layout: Layout) -> dict:
    """The centre: merged model + the mean of the owners' router changes (FedAvg) → models/merged-rt.

    The mean, not the sum: each owner's change pushes its own row up on every kind of text it saw, and
    the sum of four such pushes overshoots (measured on the demo: owner-average bpb 3.589 with the sum,
    3.437 with the mean, 3.454 untuned)."""
    started = time.time()
    meta = read_meta(layout.merged)
    expected = merged_id(meta)
    owners = [e for e in meta.get("experts", []) if e != PUBLIC]
    model = load_model(layout.merged)
    routers = {n: p for n, p in model.named_parameters() if n.endswith(ROUTER_SUFFIX)}
    norms = {}
    with torch.no_grad():
        for owner in owners:
            delta = read_update(layout, owner, expected)
            if set(delta) != set(routers) or any(delta[n].shape != routers[n].shape for n in routers):
                raise FlexoError(f"the router update of {owner!r} does not fit the merged model's routers: "
                                 f"rerun `flexo router-update --owner {owner}`")
            for n, p in routers.items():
                p.add_(delta[n] / len(owners))
            norms[owner] = round(float(sum(d.norm() ** 2 for d in delta.values()) ** 0.5), 6)
    base = {k: v for k, v in meta.items() if k not in ("wall_s", "shards", "bytes")}
    with atomic_dir(layout.merged_rt) as tmp:
        model.save_pretrained(tmp, max_shard_size=params.merge.shard_bytes)
        copy_support_files(layout.merged, tmp)
        out = dict(base, kind="merged-rt", tuned=True, opt_out_guarantee="rerun", opt_out_note=GUARANTEE_NOTE,
                   router_tune={"method": "federated", "combine": "mean", "updates": norms, "merged_id": expected,
                                "steps_per_owner": params.router_tune.steps, "lr": params.router_tune.lr},
                   wall_s=round(time.time() - started, 2))
        write_meta(tmp, out)
        write_model_card(tmp, out)
    return out


def add_cli(subparsers) -> None:
    text = "an owner's federated router update: tune the merged model's router rows on its own text, ship the change"
    p = subparsers.add_parser("router-update", help=text, description=text)
    p.add_argument("--owner", required=True, help="an owner from params.yaml")

    def handler(args):
        from flexo.cli import _ctx

        params, layout = _ctx(args)
        return router_update(args.owner, params, layout)

    p.set_defaults(fn=handler)
