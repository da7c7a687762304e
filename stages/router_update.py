"""Stage `router-update`: an owner's half of federated router tuning (`router_tune.method: federated`).

    flexo router-update --owner news

The merged model's weak spot is routing between owners: each owner's router row was shaped against
r_pub only, never against the other owners' experts, so an expert can win tokens of a domain it never
saw (SPEC §4; docs/ablation.md). No stage may read two owners' data, so each owner ships a summary
instead: its own 2-expert model is run over its own train text and the mean and covariance of every
layer's router input are written — (ε, δ)-differentially private per document with
`router_tune.dp_epsilon`, as top-r eigenpairs with `router_tune.stats_rank` (:mod:`flexo.router_stats`).
The centre's half is `flexo router-tune`.

An owner's summary depends only on its data, its expert and the public model, so it is not recomputed
when another owner joins or leaves.
"""

from __future__ import annotations

import time

from safetensors.torch import save_file

from flexo import timings
from flexo.data import curated_manifest, read_split
from flexo.errors import FlexoError
from flexo.fsutil import atomic_path, write_json
from flexo.layout import Layout
from flexo.modeling import load_model, load_tokenizer_from
from flexo.package import ExpertPackage
from flexo.params import Params
from flexo.project import stage_command
from flexo.router_fit import gates
from flexo.router_stats import (
    Privacy, achieved_epsilon, calibrate, clip_norms, document_features, min_tokens, owner_secret, shipped_numbers,
    summarize,
)
from flexo.training import set_threads


def router_update(owner: str, params: Params, layout: Layout) -> dict:
    """The owner's half: statistics of its own model's router inputs on its own train documents, (ε, δ)-DP
    and in low-rank form when router_tune says so (flexo/router_stats.py)."""
    params.check_owner(owner)
    started = time.time()
    set_threads()
    rt = params.router_tune
    out = layout.router_update(owner)
    info = {"owner": owner, "method": rt.method}
    if rt.method != "federated":
        # Keep the DVC output present but empty: the centre tunes another way (or not at all).
        with atomic_path(out) as tmp:
            save_file({}, str(tmp), metadata={"skipped": "true"})
        write_json(out.with_suffix(".json"), dict(info, skipped=True))
        return dict(info, skipped=True)
    model_dir = layout.expert(owner) / "model"
    if not (model_dir / "config.json").is_file():
        raise FlexoError(f"no model of owner {owner!r} in {model_dir}: run `flexo train-expert --owner {owner}` first")
    package = ExpertPackage.read(layout.expert(owner), owner=owner)
    hidden = package.hidden_size
    if rt.stats_rank >= hidden:
        raise FlexoError(f"router_tune.stats_rank {rt.stats_rank} must be below the model width {hidden} "
                         "(0 = the full covariance)")
    texts = read_split(layout, owner, "train")
    tokenizer = load_tokenizer_from(model_dir, fix=f"rerun `flexo train-expert --owner {owner}`")
    model = load_model(model_dir)
    features, doc_index = document_features(model, tokenizer, texts, max_tokens=params.model.max_seq_len,
                                            max_documents=rt.stats_documents)
    need = min_tokens(hidden, rt.stats_rank)
    if len(doc_index) < need:
        raise FlexoError(f"{owner} train split: only {len(doc_index)} tokens for router statistics, at least {need} are "
                         f"needed for width {hidden} and rank {rt.stats_rank or 'full'}: add documents, raise "
                         "router_tune.stats_documents or lower router_tune.stats_rank")
    documents = int(doc_index.max()) + 1
    privacy, secret = None, b""
    if rt.dp_epsilon > 0:
        sigma = calibrate(rt.dp_epsilon, rt.dp_delta, documents)
        privacy = Privacy(rt.dp_epsilon, rt.dp_delta, clip_norms(params, layout), params.model.max_seq_len, sigma)
        secret = owner_secret(layout)
    data_sha = curated_manifest(layout, owner)["splits"]["train"]["sha256"]
    stats = summarize(features, doc_index, rank=rt.stats_rank, privacy=privacy, secret=secret,
                      what=f"{owner}:{data_sha}:{package.tensors_sha256}")
    info.update({"tokens": int(stats["tokens"]), "layers": len(gates(model)),
                 # Under DP the exact document count is not shipped (flexo/router_stats.py).
                 "documents": documents if privacy is None else None,
                 "public_fingerprint": package.public_fingerprint, "rank": rt.stats_rank,
                 "numbers_shipped": shipped_numbers(stats),
                 "dp": privacy.record() | {"epsilon": round(achieved_epsilon(privacy.noise_multiplier,
                                                                              rt.dp_delta), 6)}
                 if privacy else None})
    with atomic_path(out) as tmp:
        save_file(stats, str(tmp), metadata={"format": "flexo-router-stats-v2"})
    write_json(out.with_suffix(".json"), info)
    timings.record(layout.root, f"router-update@{owner}", wall_s=round(time.time() - started, 1))
    return info


def add_cli(sub) -> None:
    stage_command(sub, "router-update", "an owner's half of federated router tuning: statistics of its model's "
                  "router inputs on its own text", lambda args, project: router_update(args.owner, project.params,
                                                                                       project.layout),
                  owner="an owner from params.yaml")
