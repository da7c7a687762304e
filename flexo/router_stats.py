"""Router-input statistics: what an owner ships for federated router tuning, and how the centre reads it.

Each owner summarises its own 2-expert model's router inputs on its own text as the mean and covariance
of every layer (`flexo.router_fit.feature_stats`) — numbers over thousands of tokens, never text or
token ids — in `models/router_updates/<owner>.safetensors` + `.json`. The centre reads them back here,
checked (owner, public fingerprint, shapes, finiteness, definiteness, token count) before any model is
loaded, and computes the public class's statistics from the public model on public text.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flexo.data import read_split
from flexo.errors import FlexoError
from flexo.fsutil import read_json
from flexo.layout import Layout
from flexo.modeling import load_model, load_tokenizer_from
from flexo.params import PUBLIC, Params
from flexo.router_fit import check_stats, feature_stats, router_inputs
from flexo.training import pack

# Fewer tokens than this and a mean/covariance would say too much about too little text.
MIN_TOKENS = 2048


def stats_of(model, tokenizer, texts: list[str], params: Params, what: str) -> dict[str, torch.Tensor]:
    blocks = pack(tokenizer, texts, params.model.max_seq_len, what)
    features = router_inputs(model, blocks, max_blocks=params.router_tune.stats_blocks)
    if len(features[0]) < MIN_TOKENS:
        raise FlexoError(f"{what}: only {len(features[0])} tokens for router statistics, at least {MIN_TOKENS} "
                         "are needed: add documents or raise router_tune.stats_blocks")
    return feature_stats(features)


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
    return stats_of(model, tokenizer, read_split(layout, PUBLIC, "train"), params, "public train split")
