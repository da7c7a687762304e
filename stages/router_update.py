"""Federated router tuning: the owner's half (`flexo router-update --owner X`) and the centre's half
(`combine_updates`, run by `flexo router-tune` when `router_tune.method: federated`).

The merged model's weak spot is routing between owners: each owner's router row was shaped against
r_pub only, never against the other owners' experts, so an expert can win tokens of a domain it never
saw (SPEC §4; results/ablation.md). No stage may read two owners' data, so the owners ship summaries
instead: each owner runs its own 2-expert model over its own text and writes the mean and covariance
of every layer's router input (`flexo.router_fit.feature_stats`) — numbers over thousands of tokens,
never text or token ids. The centre fits all router rows at once as a multinomial classifier on
Gaussian samples drawn from those summaries and from the public model's own on public text.

An owner's summary depends only on its data, its expert and the public model, so it is not recomputed
when another owner joins or leaves. But every owner's summary shapes every row of the fitted router,
so the tuned model's opt-out guarantee is "rerun": withdrawing an owner reruns the merge and the fit
(seconds), which `dvc repro` does once the owner is removed from params.yaml.
"""

from __future__ import annotations

import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexo.errors import FlexoError
from flexo.fsutil import atomic_dir, atomic_path, read_json, write_json
from flexo.layout import Layout
from flexo.modeling import load_config, load_model, load_tokenizer_from, read_meta, write_meta
from flexo.params import PUBLIC, Params
from flexo.router_fit import check_stats, check_stats_scale, feature_stats, fit_router, gates, router_inputs
from flexo.training import pack, set_threads
from stages.curate import read_split
from stages.merge import copy_support_files, write_model_card

GUARANTEE_NOTE = ("every owner's router-input statistics shaped all router rows (federated router fit): "
                  "withdrawing an owner reruns merge and router_tune (the other owners' stages stay); "
                  "`dvc repro` does this when the owner is removed from params.yaml")
# Fewer tokens than this and a mean/covariance would say too much about too little text.
MIN_TOKENS = 2048


def _stats_of(model, tokenizer, texts: list[str], params: Params, what: str) -> dict[str, torch.Tensor]:
    blocks = pack(tokenizer, texts, params.model.max_seq_len, what)
    features = router_inputs(model, blocks, max_blocks=params.router_tune.stats_blocks)
    if len(features[0]) < MIN_TOKENS:
        raise FlexoError(f"{what}: only {len(features[0])} tokens for router statistics, at least {MIN_TOKENS} "
                         "are needed: add documents or raise router_tune.stats_blocks")
    return feature_stats(features)


def router_update(owner: str, params: Params, layout: Layout) -> dict:
    """The owner's half: statistics of its own model's router inputs on its own train text."""
    params.check_owner(owner)
    started = time.time()
    set_threads()
    out = layout.router_update(owner)
    info = {"owner": owner, "method": params.router_tune.method}
    if params.router_tune.method != "federated":
        # Keep the DVC output present but empty: the centre tunes another way (or not at all).
        with atomic_path(out) as tmp:
            save_file({}, str(tmp), metadata={"skipped": "true"})
        write_json(out.with_suffix(".json"), dict(info, skipped=True))
        return dict(info, skipped=True)
    model_dir = layout.expert(owner) / "model"
    if not (model_dir / "config.json").is_file():
        raise FlexoError(f"no model of owner {owner!r} in {model_dir}: run `flexo train-expert --owner {owner}` first")
    package = read_json(layout.expert(owner) / "expert.json", what="expert manifest")
    tokenizer = load_tokenizer_from(model_dir, fix=f"rerun `flexo train-expert --owner {owner}`")
    model = load_model(model_dir)
    stats = _stats_of(model, tokenizer, read_split(layout, owner, "train"), params, f"{owner} train split")
    info.update({"tokens": int(stats["tokens"]), "layers": len(gates(model)),
                 "public_fingerprint": package.get("public_fingerprint"),
                 "wall_s": round(time.time() - started, 1)})
    with atomic_path(out) as tmp:
        save_file(stats, str(tmp), metadata={"format": "flexo-router-stats-v1"})
    write_json(out.with_suffix(".json"), info)
    return info


def update_name(layout: Layout, owner: str) -> str:
    return f"router statistics of {owner!r} ({layout.router_update(owner)})"


def read_update(layout: Layout, owner: str, public_fp: str | None, num_layers: int, hidden: int) -> dict[str, torch.Tensor]:
    path = layout.router_update(owner)
    if not path.with_suffix(".json").is_file():
        raise FlexoError(f"no router statistics of {owner!r} ({path}): run `flexo router-update --owner {owner}` "
                         "(the owner's side of router_tune.method: federated) first")
    info = read_json(path.with_suffix(".json"), what="router statistics manifest")
    if info.get("skipped"):
        raise FlexoError(f"the router statistics of {owner!r} were skipped (method {info.get('method')}): rerun "
                         f"`flexo router-update --owner {owner}` with router_tune.method: federated")
    if public_fp and info.get("public_fingerprint") != public_fp:
        raise FlexoError(f"the router statistics of {owner!r} come from an expert trained against another public "
                         f"model: rerun `flexo train-expert --owner {owner}` and `flexo router-update --owner {owner}`")
    try:
        stats = load_file(path)
    except (SafetensorError, OSError) as e:
        raise FlexoError(f"router statistics {path} are unreadable ({e}): rerun `flexo router-update --owner {owner}`") from None
    if info.get("owner") != owner:
        raise FlexoError(f"router statistics {path} say owner {info.get('owner')!r}, not {owner!r}: rerun "
                         f"`flexo router-update --owner {owner}`")
    check_stats(stats, num_layers, hidden, update_name(layout, owner), min_tokens=MIN_TOKENS)
    return stats


def public_stats(params: Params, layout: Layout) -> dict[str, torch.Tensor]:
    """The public class: the public model's router inputs on public train text (public data only)."""
    model = load_model(layout.public_model)
    tokenizer = load_tokenizer_from(layout.public_model, fix="rerun `flexo train-public`")
    return _stats_of(model, tokenizer, read_split(layout, PUBLIC, "train"), params, "public train split")


def combine_updates(params: Params, layout: Layout) -> dict:
    """The centre: fit every layer's router rows from the owners' statistics → models/merged-rt."""
    started = time.time()
    set_threads()
    meta = read_meta(layout.merged)
    owners = [e for e in meta.get("experts", []) if e != PUBLIC]
    cfg = load_config(layout.merged)
    # Every owner's statistics are read and checked before any model is loaded; their scale is checked
    # against the public model's own statistics, computed next.
    updates = [read_update(layout, o, meta.get("fingerprint"), cfg.num_hidden_layers, cfg.hidden_size) for o in owners]
    public = public_stats(params, layout)
    for owner, update in zip(owners, updates):
        check_stats_scale(update, public, cfg.num_hidden_layers, update_name(layout, owner))
    stats = [public, *updates]
    model = load_model(layout.merged)
    rt = params.router_tune
    rows, figures = fit_router(stats, cfg.num_hidden_layers, samples=rt.fit_samples, l2=rt.fit_l2,
                               steps=rt.fit_steps, lr=rt.fit_lr, seed=rt.seed, names=[PUBLIC, *owners])
    with torch.no_grad():
        for gate, w in zip(gates(model), rows):
            gate.weight[1:] = gate.weight[0] + w  # r_pub stays: it is the public model's row
    base = {k: v for k, v in meta.items() if k not in ("wall_s", "shards", "bytes")}
    from stages.router_tune import tuned_model_guard

    with atomic_dir(layout.merged_rt, tuned_model_guard()) as tmp:
        model.save_pretrained(tmp, max_shard_size=params.merge.shard_bytes)
        copy_support_files(layout.merged, tmp)
        out = dict(base, kind="merged-rt", tuned=True, opt_out_guarantee="rerun", opt_out_note=GUARANTEE_NOTE,
                   router_tune={"method": "federated", "fit": "multinomial logistic regression on Gaussian samples",
                                "tokens": {name: int(s["tokens"]) for name, s in zip([PUBLIC, *owners], stats)},
                                "samples_per_class": rt.fit_samples, "steps": rt.fit_steps, "lr": rt.fit_lr,
                                "l2": rt.fit_l2, "layers": figures},
                   wall_s=round(time.time() - started, 2))
        write_meta(tmp, out)
        write_model_card(tmp, out)
    return out


def add_cli(subparsers) -> None:
    text = "an owner's half of federated router tuning: statistics of its model's router inputs on its own text"
    p = subparsers.add_parser("router-update", help=text, description=text)
    p.add_argument("--owner", required=True, help="an owner from params.yaml")

    def handler(args):
        from flexo.cli import _ctx

        params, layout = _ctx(args)
        return router_update(args.owner, params, layout)

    p.set_defaults(fn=handler)
