"""Exact opt-out of the router-tuned model: its router rows refitted without the withdrawn owners.

The default model (`models/merged-rt`, federated router fit) has every router row fitted from every
owner's statistics, so masking an owner's expert is not the same as a model that never saw that owner:
the other rows still carry what its statistics taught. The fit is cheap and deterministic, and its
inputs — every class's statistics — are kept inside the tuned model folder (`router_stats.safetensors`,
written by `flexo router-tune`). So opting owners out of that model refits the rows from the remaining
classes with the same settings: the result equals `flexo merge --exclude X` followed by `flexo
router-tune` without X, and it is what `flexo opt-out` writes and what `FlexoServer` serves per request
(:func:`refitted_weights`, cached per exclusion set by the server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexo.errors import FlexoError
from flexo.params import PUBLIC
from flexo.router_fit import fit_router
from flexo.router_stats import embedded_path

FIT_KEYS = ("samples_per_class", "steps", "lr", "l2", "seed")


def embed_stats(folder: Path, stats: dict[str, dict[str, torch.Tensor]]) -> None:
    """Keep the fit's inputs (class name → statistics, public first) inside a tuned model folder."""
    flat = {f"{name}/{key}": t.contiguous() for name, s in stats.items() for key, t in s.items()}
    save_file(flat, str(embedded_path(folder)), metadata={"format": "flexo-router-fit-inputs-v1",
                                                          "classes": ",".join(stats)})


def read_embedded(model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    path = embedded_path(model_dir)
    try:
        flat = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            classes = (f.metadata() or {}).get("classes", "").split(",")
    except (SafetensorError, OSError) as e:
        raise FlexoError(f"{path} is unreadable ({e}): rerun `flexo router-tune`") from None
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in classes if c}
    for key, t in flat.items():
        name, _, rest = key.partition("/")
        if name not in out:
            raise FlexoError(f"{path} holds statistics of {name!r}, not in its class list {classes}: rerun `flexo router-tune`")
        out[name][rest] = t
    return out


def needs_refit(meta: dict) -> bool:
    """Whether opting an owner out of this model must refit the router rows to be exact."""
    return (meta.get("router_tune") or {}).get("method") == "federated"


def refitted_weights(model_dir: Path, meta: dict, exclude: Sequence[str], r_pub: list[torch.Tensor]
                     ) -> list[torch.Tensor]:
    """Per layer, the router weight [1 + kept owners, h] of the tuned model refitted without `exclude`
    (r_pub first, then r_pub + w of each kept owner, in the model's order)."""
    fit = meta.get("router_tune") or {}
    if any(k not in fit for k in FIT_KEYS):
        raise FlexoError(f"{model_dir}/flexo.json does not record the router fit's settings: rerun `flexo router-tune`")
    stats = read_embedded(model_dir)
    experts = list(meta.get("experts") or [])
    kept = [e for e in experts if e not in set(exclude)]
    missing = [e for e in kept if e not in stats]
    if missing:
        raise FlexoError(f"{embedded_path(model_dir)} lacks the statistics of {missing}: rerun `flexo router-tune`")
    rows, _ = fit_router([stats[e] for e in kept], len(r_pub), samples=fit["samples_per_class"], l2=fit["l2"],
                         steps=fit["steps"], lr=fit["lr"], seed=fit["seed"], names=kept)
    return [torch.cat([r[None], r[None] + w.to(r.dtype)]) for r, w in zip(r_pub, rows)]


def keep_embedded(src: Path, dst: Path, exclude: Sequence[str]) -> None:
    """The fit inputs of an opted-out copy: the source's, without the excluded owners' statistics."""
    stats = read_embedded(src)
    embed_stats(dst, {name: s for name, s in stats.items() if name == PUBLIC or name not in set(exclude)})
