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

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexo.errors import FlexoError
from flexo.model_files import needs_refit  # noqa: F401 (re-exported: read without torch by the opt-out)
from flexo.params import PUBLIC
from flexo.router_fit import fit_router
from flexo.router_stats import dense, embedded_path
from flexo.threads import torch_threads

FIT_KEYS = ("samples_per_class", "steps", "lr", "l2", "seed")
REFITS = "router_refits.safetensors"  # each single owner's opt-out refit, precomputed by router-tune


def embed_stats(folder: Path, stats: dict[str, dict[str, torch.Tensor]]) -> None:
    """Keep the fit's inputs (class name → statistics, public first) inside a tuned model folder, each in
    the form it arrived in: an owner's rank-r statistics stay rank r (r·h numbers a layer, not h²), and
    :func:`read_embedded` expands them exactly as router-tune did before fitting."""
    flat = {f"{name}/{key}": t.contiguous() for name, s in stats.items() for key, t in s.items()}
    # One metadata key: safetensors writes a metadata map of several keys in a random order, so the file's
    # bytes (and its DVC hash) would differ from run to run.
    header = json.dumps({"format": "flexo-router-fit-inputs-v1", "classes": list(stats)}, sort_keys=True)
    save_file(flat, str(embedded_path(folder)), metadata={"flexo": header})


def read_embedded(model_dir: Path, *, expand: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """The fit inputs kept in a tuned model folder; `expand`: every covariance dense, as the fit reads them
    (on one thread, as router-tune expands them, so a refit sees the same bits)."""
    path = embedded_path(model_dir)
    try:
        flat = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        # Earlier flexo wrote the class list as its own key (see embed_stats).
        classes = json.loads(metadata["flexo"])["classes"] if "flexo" in metadata else metadata.get("classes", "").split(",")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise FlexoError(f"{path} is unreadable ({e}): rerun `flexo router-tune`") from None
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in classes if c}
    for key, t in flat.items():
        name, _, rest = key.partition("/")
        if name not in out:
            raise FlexoError(f"{path} holds statistics of {name!r}, not in its class list {classes}: rerun `flexo router-tune`")
        out[name][rest] = t
    if not expand:
        return out
    with torch_threads(1):
        return {name: dense(s, sum(k.endswith(".mean") for k in s)) for name, s in out.items()}


def refitted_weights(model_dir: Path, meta: dict, exclude: Sequence[str], r_pub: list[torch.Tensor]
                     ) -> list[torch.Tensor]:
    """Per layer, the router weight [1 + kept owners, h] of the tuned model refitted without `exclude`
    (r_pub first, then r_pub + w of each kept owner, in the model's order). A single owner's refit was
    computed by `flexo router-tune` and is read from the folder (:func:`store_refits`); any other set is
    fitted now (seconds per layer)."""
    fit = meta.get("router_tune") or {}
    if any(k not in fit for k in FIT_KEYS):
        raise FlexoError(f"{model_dir}/flexo.json does not record the router fit's settings: rerun `flexo router-tune`")
    names = list(dict.fromkeys(exclude))
    if len(names) == 1:
        stored = read_refit(model_dir, names[0], len(r_pub))
        if stored is not None:
            return stored
    return refit(read_embedded(model_dir), list(meta.get("experts") or []), names, fit, r_pub,
                 where=embedded_path(model_dir))


def refit(stats: dict[str, dict[str, torch.Tensor]], experts: list[str], exclude: Sequence[str], fit: dict,
          r_pub: list[torch.Tensor], where: Path | str = "the statistics") -> list[torch.Tensor]:
    """The rows that `flexo router-tune` fits when `exclude` were never merged (see refitted_weights)."""
    kept = [e for e in experts if e not in set(exclude)]
    missing = [e for e in kept if e not in stats]
    if missing:
        raise FlexoError(f"{where} lacks the statistics of {missing}: rerun `flexo router-tune`")
    rows, _ = fit_router([stats[e] for e in kept], len(r_pub), samples=fit["samples_per_class"], l2=fit["l2"],
                         steps=fit["steps"], lr=fit["lr"], seed=fit["seed"], names=kept)
    return [torch.cat([r[None], r[None] + w.to(r.dtype)]) for r, w in zip(r_pub, rows)]


def store_refits(folder: Path, stats: dict[str, dict[str, torch.Tensor]], experts: list[str], fit: dict,
                 r_pub: list[torch.Tensor]) -> None:
    """Every single owner's opt-out refit, computed once where the model is tuned and kept beside it
    (`router_refits.safetensors`), so that serving or evaluating an owner's opt-out costs nothing extra."""
    from tqdm.auto import tqdm

    tensors = {}
    for owner in tqdm([e for e in experts if e != PUBLIC], desc="opt-out refits", unit="owner"):
        for i, w in enumerate(refit(stats, experts, [owner], fit, r_pub)):
            tensors[f"without/{owner}/layers.{i}"] = w.contiguous()
    save_file(tensors, str(Path(folder) / REFITS), metadata={"format": "flexo-router-refits-v1"})


def read_refit(model_dir: Path, owner: str, num_layers: int) -> list[torch.Tensor] | None:
    path = Path(model_dir) / REFITS
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise FlexoError(f"{path} is unreadable ({e}): rerun `flexo router-tune`") from None
    rows = [tensors.get(f"without/{owner}/layers.{i}") for i in range(num_layers)]
    if any(r is None for r in rows):
        return None
    return rows


def keep_embedded(src: Path, dst: Path, exclude: Sequence[str]) -> None:
    """The fit inputs of an opted-out copy: the source's, without the excluded owners' statistics."""
    stats = read_embedded(src, expand=False)
    embed_stats(dst, {name: s for name, s in stats.items() if name == PUBLIC or name not in set(exclude)})
