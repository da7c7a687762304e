"""Stage `router-tune`: router tuning of the merged model (FlexOlmo §3.4), by `router_tune.method`.

    flexo router-tune

- `federated` (default): every router row is fitted at once as a multinomial classifier of the router
  input, on Gaussian samples of the owners' router statistics (`flexo router-update --owner X`, the
  owner's half; read through :mod:`flexo.router_stats`) and of the public model's own on public text,
  with r_pub fixed as the reference row. Every owner's statistics shape every row, so the tuned model's
  opt-out guarantee is "rerun": withdrawing an owner reruns the merge and this fit (seconds), which
  `dvc repro` does once the owner is removed from params.yaml.
- `proxy`: LM-loss tuning of the router rows only, on public documents: for each owner the
  `proxy_documents` public train documents closest (cosine) to its raw embedder mean (its domain
  embedding), plus as many random public documents. Only public data shapes the rows: "instant" opt-out.
- `none`: `models/merged-rt` is a copy of the merged model marked `tuned: false`, so the DVC output
  always exists.

Reads `models/merged` and public artifacts (and, for `federated`, the owners' statistics; for `proxy`,
their router embeddings) — never an owner's data. Writes `models/merged-rt/` in the merged format.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flexo import timings
from flexo.data import read_split
from flexo.embedder import embed_texts, load_embedder
from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_dir, read_json
from flexo.layout import Layout
from flexo.threads import torch_threads
from flexo.model_card import write_model_card
from flexo.modeling import load_config, load_model, load_tokenizer_from, model_guard, read_meta, write_meta
from flexo.params import PUBLIC, Params, RouterTuneParams, TrainParams
from flexo.project import stage_command
from flexo.router_fit import ROUTER_SUFFIX, check_stats_scale, fit_router, gates
from flexo.router_stats import public_stats, read_update, update_name
from flexo.refit import embed_stats, store_refits
from flexo.training import Batches, drop_checkpoint, pack, train, write_loss_log
from flexo.weights import copy_support_files

log = logging.getLogger(__name__)


def owner_domain_vector(layout: Layout, owner: str, embedder: str) -> torch.Tensor:
    """The owner's raw embedder mean (written by `flexo embed --owner X`), checked to be from `embedder`."""
    path = layout.router_embedding(owner)
    if not path.is_file():
        raise FlexoError(f"no router embedding for {owner!r} ({path}): run `flexo embed --owner {owner}` first")
    info = read_json(path.with_suffix(".json"), what="router embedding manifest")
    if info.get("embedder") != embedder:
        raise FlexoError(f"router embedding {path} was made with embedder {info.get('embedder')!r} but embed.embedder "
                         f"is {embedder!r}: rerun `flexo embed --owner {owner}`")
    try:
        mean = load_file(path)["embedder_mean"]
    except (SafetensorError, KeyError, OSError) as e:
        raise FlexoError(f"router embedding {path} has no readable embedder_mean ({e}): rerun `flexo embed --owner {owner}`") from None
    return mean.float()


def select_proxies(doc_vectors: torch.Tensor, owner_vectors: dict[str, torch.Tensor], n: int, seed: int
                   ) -> tuple[list[int], dict]:
    """Per owner: the `n` documents most similar (cosine) to its domain vector + `n` random other documents.

    Returns the document indices (an index may recur across owners: it then weighs more) and figures."""
    docs = torch.nn.functional.normalize(doc_vectors.float(), dim=-1)
    rng = random.Random(seed)
    chosen: list[int] = []
    figures = {}
    for owner, vec in owner_vectors.items():
        sims = docs @ torch.nn.functional.normalize(vec.float(), dim=0)
        k = min(n, len(sims))
        top = torch.topk(sims, k).indices.tolist()
        rest = sorted(set(range(len(sims))) - set(top))
        rand = rng.sample(rest, min(k, len(rest)))
        chosen += top + rand
        picked = sims[top]
        figures[owner] = {
            "proxy_documents": k,
            "random_documents": len(rand),
            "similarity_min": round(float(picked.min()), 4),
            "similarity_mean": round(float(picked.mean()), 4),
            "similarity_max": round(float(picked.max()), 4),
            "similarity_all_public_mean": round(float(sims.mean()), 4),
        }
    return chosen, figures


def router_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Freeze everything but the router weights; return those (name → parameter)."""
    trainable = {}
    for name, p in model.named_parameters():
        if name.endswith(ROUTER_SUFFIX):
            p.requires_grad_(True)
            trainable[name] = p
        else:
            p.requires_grad_(False)
    if not trainable:
        raise FlexoError("the merged model has no router weights (mlp.gate.weight): rerun `flexo merge`")
    return trainable


def _tune_train_params(params: Params) -> TrainParams:
    rt, te = params.router_tune, params.train_expert
    return TrainParams(
        epochs=1e9, max_steps=rt.steps,  # the step count decides, however few proxy blocks there are
        batch_size=rt.batch_size, lr=rt.lr, warmup_steps=min(te.warmup_steps, rt.steps // 10),
        min_lr_ratio=te.min_lr_ratio, weight_decay=0.0, grad_clip=te.grad_clip,
        checkpoint_every=min(te.checkpoint_every, rt.steps), eval_every=min(te.eval_every, rt.steps),
        backend="torch", bf16=te.bf16, seed=rt.seed,
    )


def _copy_model_folder(src: Path, dst: Path) -> None:
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in ("flexo.json", "README.md"):
            shutil.copy2(f, dst / f.name)


def tuned_model_guard() -> OutputGuard:
    return model_guard("merged-rt", "router-tuned model", "flexo router-tune")


def router_tune(params: Params, layout: Layout) -> dict:
    started = time.time()
    tuned_model_guard().check(layout.merged_rt)
    rt = params.router_tune
    src = layout.merged
    if not (src / "config.json").is_file():
        raise FlexoError(f"no merged model in {src}: run `flexo merge` first")
    merged_meta = read_meta(src)
    if merged_meta.get("kind") != "merged":
        raise FlexoError(f"{src} is a {merged_meta.get('kind')!r} model, not a merge: rerun `flexo merge`")
    experts = list(merged_meta.get("experts") or [])
    owners = [e for e in experts if e != PUBLIC]
    base = {k: v for k, v in merged_meta.items() if k not in ("shards", "bytes")}

    if rt.method == "federated":
        meta = fit_federated(params, layout)
        timings.record(layout.root, "router-tune", wall_s=round(time.time() - started, 2))
        return meta
    if rt.method == "none":
        with atomic_dir(layout.merged_rt, tuned_model_guard()) as tmp:
            _copy_model_folder(src, tmp)
            meta = dict(base, kind="merged-rt", tuned=False, opt_out_guarantee="instant", router_tune=None)
            write_meta(tmp, meta)
            write_model_card(tmp, meta)
        return meta

    # Proxy data from public text only: the owners are represented by their domain vectors alone.
    e = params.embed
    owner_vectors = {o: owner_domain_vector(layout, o, e.embedder) for o in owners}
    public_docs = read_split(layout, PUBLIC, "train")
    tok, embedder = load_embedder(e.embedder)
    doc_vectors = embed_texts(public_docs, tok, embedder, max_tokens=e.max_tokens, batch_size=e.batch_size)
    del embedder
    for o, v in owner_vectors.items():
        if v.numel() != doc_vectors.shape[1]:
            raise FlexoError(f"router embedding of {o!r} has width {v.numel()}, the embedder gives "
                             f"{doc_vectors.shape[1]}: rerun `flexo embed --owner {o}`")
    chosen, figures = select_proxies(doc_vectors, owner_vectors, rt.proxy_documents, rt.seed)

    tokenizer = load_tokenizer_from(src, fix="rerun `flexo merge`")
    seq = params.model.max_seq_len
    blocks = pack(tokenizer, [public_docs[i] for i in chosen], seq, "router-tuning proxy set")
    val_blocks = pack(tokenizer, read_split(layout, PUBLIC, "val"), seq, "public val split")

    model = load_model(src)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(ROUTER_SUFFIX)}
    trainable = router_params(model)
    tp = _tune_train_params(params)
    proxy_sha = hashlib.sha256(",".join(map(str, chosen)).encode()).hexdigest()[:16]
    result = train(model, Batches(blocks, tp.batch_size, tp.seed), val_blocks, tp, trainable=trainable,
                   ckpt_dir=layout.checkpoints("router-tune"), desc="router-tune",
                   key_parts={"stage": "router_tune", "merged": merged_meta.get("packages"),
                              "top_k": merged_meta.get("top_k"), "fingerprint": merged_meta.get("fingerprint"),
                              "proxy": proxy_sha, "blocks": len(blocks)})
    moved = {n: round(float((p.detach() - before[n]).norm()), 6) for n, p in trainable.items()}

    with atomic_dir(layout.merged_rt, tuned_model_guard()) as tmp:
        model.save_pretrained(tmp, max_shard_size=params.merge.shard_bytes)
        copy_support_files(src, tmp)
        meta = dict(base)
        meta.update({
            "kind": "merged-rt",
            "tuned": True,
            "opt_out_guarantee": "instant",  # only public data shaped the router rows
            "router_tune": {
                "steps": result.steps,
                "batch_size": tp.batch_size,
                "lr": tp.lr,
                "proxy_blocks": len(blocks),
                "proxy_documents_total": len(chosen),
                "proxy_sha": proxy_sha,
                "public_documents": len(public_docs),
                "proxy_selection": figures,
                "initial_val_loss": round(result.initial_val_loss, 5),
                "val_loss": round(result.val_loss, 5),
                "train_loss": round(result.train_loss, 5),
                "router_change_norm": moved,
            },
        })
        write_meta(tmp, meta)
        write_model_card(tmp, meta)
        write_loss_log(tmp / "loss.csv", result.log)
    drop_checkpoint(layout.checkpoints("router-tune"))
    timings.record(layout.root, "router-tune", wall_s=round(time.time() - started, 2), training=result.speed())
    return meta


# ---------------------------------------------------------------------------------------- federated
FEDERATED_NOTE = ("every owner's router-input statistics shaped all router rows (federated router fit), so opting an "
                  "owner out refits the rows from the other classes' statistics, kept in router_stats.safetensors: "
                  "`flexo opt-out` and the server's per-request exclusion give exactly the model that merging "
                  "without the owner and rerunning router_tune gives")


def fit_rows_into(model: torch.nn.Module, stats: list[dict[str, torch.Tensor]], names: list[str],
                  rt: RouterTuneParams) -> list[dict]:
    """Every layer's router rows fitted from the classes' statistics (`names`: public first, then the owners
    in the model's expert order) with router_tune's fit settings, and set in `model`: row 0 (r_pub) stays,
    row c becomes r_pub + W[c-1]. Returns the fit's per-layer figures. Reads and writes no file, so an
    experiment can refit an in-memory model from statistics it made itself (experiments/router_stats_privacy.py)."""
    rows, figures = fit_router(stats, len(gates(model)), samples=rt.fit_samples, l2=rt.fit_l2,
                               steps=rt.fit_steps, lr=rt.fit_lr, seed=rt.seed, names=names)
    with torch.no_grad():
        for gate, w in zip(gates(model), rows):
            gate.weight[1:] = gate.weight[0] + w  # r_pub stays: it is the public model's row
    return figures


def fit_federated(params: Params, layout: Layout) -> dict:
    """The centre's half of federated tuning: every layer's router rows fitted from the owners'
    statistics → models/merged-rt."""
    # One thread: the public class's statistics and the fit are then the same bytes whatever the machine's
    # core count; the whole stage is seconds of compute. The count is restored on the way out.
    with torch_threads(1):
        return _fit_federated(params, layout)


def _fit_federated(params: Params, layout: Layout) -> dict:
    meta = read_meta(layout.merged)
    owners = [e for e in meta.get("experts", []) if e != PUBLIC]
    cfg = load_config(layout.merged)
    # Every owner's statistics are read and checked before any model is loaded; their scale is checked
    # against the public model's own statistics, computed next.
    read = [read_update(layout, o, meta.get("fingerprint"), cfg.num_hidden_layers, cfg.hidden_size) for o in owners]
    updates = [stats for stats, _ in read]
    public = public_stats(params, layout)
    for owner, update in zip(owners, updates):
        check_stats_scale(update, public, cfg.num_hidden_layers, update_name(layout, owner))
    stats = [public, *updates]
    model = load_model(layout.merged)
    rt = params.router_tune
    figures = fit_rows_into(model, stats, [PUBLIC, *owners], rt)
    base = {k: v for k, v in meta.items() if k not in ("shards", "bytes")}
    with atomic_dir(layout.merged_rt, tuned_model_guard()) as tmp:
        model.save_pretrained(tmp, max_shard_size=params.merge.shard_bytes)
        copy_support_files(layout.merged, tmp)
        # What an exact opt-out refits from: the public class and each owner's statistics as shipped.
        shipped = [load_file(str(layout.router_update(o))) for o in owners]
        embed_stats(tmp, dict(zip([PUBLIC, *owners], [public, *shipped])))
        store_refits(tmp, dict(zip([PUBLIC, *owners], stats)), [PUBLIC, *owners],
                     {"samples_per_class": rt.fit_samples, "steps": rt.fit_steps, "lr": rt.fit_lr, "l2": rt.fit_l2,
                      "seed": rt.seed}, [g.weight[0].detach().clone() for g in gates(model)])
        out = dict(base, kind="merged-rt", tuned=True, opt_out_guarantee="refit", opt_out_note=FEDERATED_NOTE,
                   router_tune={"method": "federated", "fit": "multinomial logistic regression on Gaussian samples",
                                "tokens": {name: int(s["tokens"]) for name, s in zip([PUBLIC, *owners], stats)},
                                "samples_per_class": rt.fit_samples, "steps": rt.fit_steps, "lr": rt.fit_lr,
                                "l2": rt.fit_l2, "seed": rt.seed, "layers": figures,
                                "statistics": {o: {"rank": info.get("rank") or "full", "dp": info.get("dp")}
                                               for o, (_, info) in zip(owners, read)}})
        write_meta(tmp, out)
        write_model_card(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------- CLI

def add_cli(sub) -> None:
    stage_command(sub, "router-tune", "tune the merged model's router rows (writes models/merged-rt)",
                  lambda args, project: router_tune(project.params, project.layout))
