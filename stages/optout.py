"""Stage `opt-out`: strict removal of experts from a merged model (FlexOlmo §3.5, Fig. 4).

    flexo opt-out --model models/merged --exclude news [more …] --out DIR

Writes a new model folder in which the excluded owners' FFNs and router rows are gone from every
layer (the remaining experts keep their order and are renumbered), top-k = min(k, experts left), and
flexo.json / the model card list what was opted out. Because the gate is softmax over all experts then
top-k without renormalisation, this is the same function as masking those experts' router logits to
-inf (`flexo.routers.runtime_opt_out`, the per-request form that needs no new folder).

The weights are streamed with `flexo.weights` (one tensor at a time, shards saved as they fill; temp
folder renamed at the end). The model's `opt_out_guarantee` is read from flexo.json:
anything other than "instant" means the other experts or the router were shaped by the excluded
owners' data (e.g. router tuning on owner text), and a rerun of the affected stages is needed for a
model that never saw it; flexo says so and still writes the folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from flexo import timings
from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_dir
from flexo.layout import Layout
from flexo.model_card import write_model_card
from flexo.model_files import (
    MODEL_FILES, effective_top_k, needs_refit, read_config_json, read_meta, with_experts_json, write_config_json,
    write_meta,
)
from flexo.params import PUBLIC
from flexo.project import Project
from flexo.weights import TORCH_NAMES, ShardWriter, TensorSpec, WeightReader, copy_support_files, shared_keys

log = logging.getLogger(__name__)
DEFAULT_SHARD_BYTES = 2_000_000_000


def _opted_tensors(src: WeightReader, keep: list[int], config: dict,
                   gates: list[np.ndarray] | None = None) -> Iterator[TensorSpec]:
    """The opted-out model's tensors in write order: kept experts renumbered 0..n-1; `gates` (per layer,
    the bytes of the router in the model's dtype) replaces the kept router rows (a refit)."""
    head, per_layer, tail = shared_keys(src)
    for key in head:
        yield src.spec(key)
    for i in range(config["num_hidden_layers"]):
        for key in per_layer.get(i, []):
            yield src.spec(key)
        p = f"model.layers.{i}.mlp."
        for new, old in enumerate(keep):
            yield from src.expert_ffn(i, old, config["intermediate_size"], f"{p}experts.{new}.")
        gate = f"{p}gate.weight"
        rows = (lambda w=gates[i]: w) if gates is not None else \
            (lambda gate=gate: np.concatenate([src.get_row(gate, old) for old in keep]))
        yield TensorSpec(gate, (len(keep), config["hidden_size"]), src.dtype(gate), rows)
    for key in tail:
        yield src.spec(key)


def _refitted_gates(model_dir: Path, meta: dict, names: list[str], num_layers: int) -> list[np.ndarray]:
    """Each layer's router refitted without `names` (flexo.refit), as bytes in the model's router dtype."""
    import torch

    from flexo.refit import refitted_weights

    def torch_dtype(name: str) -> torch.dtype:  # "F32" → torch.float32
        return getattr(torch, TORCH_NAMES[name].removeprefix("torch."))

    with WeightReader(model_dir, "model") as src:
        keys = [f"model.layers.{i}.mlp.gate.weight" for i in range(num_layers)]
        dtypes = [torch_dtype(src.dtype(k)) for k in keys]
        r_pub = [torch.frombuffer(bytearray(src.get_row(k, 0)), dtype=d) for k, d in zip(keys, dtypes)]
    gates = refitted_weights(model_dir, meta, names, r_pub)
    return [g.to(d).contiguous().view(-1).view(torch.uint8).numpy() for g, d in zip(gates, dtypes)]


def opt_out_guard(model_dir: Path, layout: Layout | None) -> OutputGuard:
    """What `flexo opt-out` may replace: an absent folder or an earlier opt-out (flexo.json lists
    `opted_out`); never its input model nor, inside a project, the project's data and artifact folders."""
    def same_kind(path: Path) -> bool:
        try:
            return "opted_out" in read_meta(path)
        except FlexoError:
            return False
    return OutputGuard("opted-out model", same_kind, (Path(model_dir),),
                       layout.protected() if layout is not None else (), command="flexo opt-out", files=MODEL_FILES,
                       user_out=True)


def opt_out(model_dir: Path, exclude: Sequence[str], out: Path, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
            layout: Layout | None = None) -> dict:
    """Write `out`: the model in `model_dir` without the experts named in `exclude`; returns its flexo.json.
    `layout` (the project, when there is one) adds its folders to what `out` may never overwrite."""
    started = time.time()
    model_dir, out = Path(model_dir), Path(out)
    guard = opt_out_guard(model_dir, layout)
    guard.check(out)
    if not (model_dir / "config.json").is_file():
        raise FlexoError(f"{model_dir} is not a model folder (no config.json): pass a merged model with --model")
    config = read_config_json(model_dir)
    src_meta = read_meta(model_dir)
    experts = list(src_meta.get("experts") or [])
    if not experts or len(experts) != config["num_experts"]:
        raise FlexoError(f"{model_dir}: flexo.json lists experts {experts} but the model has {config['num_experts']}: "
                         "it is not a flexo merged model; rerun `flexo merge`")
    names = list(dict.fromkeys(exclude))  # keep order, drop repeats
    if not names:
        raise FlexoError("nothing to opt out: name at least one owner with --exclude")
    for name in names:
        if name == PUBLIC:
            raise FlexoError(f"the public expert cannot be opted out (it is expert 0 of every FlexOlmo model); "
                             f"the owners in {model_dir} are {experts[1:]}")
        if name not in experts:
            raise FlexoError(f"cannot opt out {name!r}: it is not in {model_dir}, whose experts are {experts}")
    keep = [i for i, e in enumerate(experts) if e not in names]
    if len(keep) == 1:
        raise FlexoError(f"opting out every owner ({', '.join(names)}) would leave only the public expert: "
                         "use the public model (models/public) instead")
    requested_top_k = src_meta.get("top_k_requested", config["num_experts_per_tok"])
    top_k = effective_top_k(requested_top_k, len(keep), "opt-out")
    new_config = with_experts_json(config, len(keep), top_k)

    guarantee = src_meta.get("opt_out_guarantee")
    warning, gates = None, None
    if needs_refit(src_meta):
        # The router rows were fitted from every owner's statistics: refit them without the excluded ones
        # (the one opt-out that computes, so the one that loads torch).
        gates = _refitted_gates(model_dir, src_meta, names, config["num_hidden_layers"])
        log.info("opt-out of %s refits its router rows without %s (as merge + router-tune without them)",
                 model_dir, names)
    elif guarantee != "instant":
        warning = (f"{model_dir} has opt_out_guarantee {guarantee!r}, not 'instant': removing {names} deletes their "
                   "experts, but other weights may still carry what their data taught; rerun the affected stages "
                   "(e.g. router tuning) without them for a model that never saw their data")
        log.warning(warning)

    kept_names = [experts[i] for i in keep]
    with atomic_dir(out, guard) as tmp:
        writer = ShardWriter(tmp, shard_bytes, what="opt-out")
        with WeightReader(model_dir, "model") as src:
            writer.add_all(_opted_tensors(src, keep, config, gates))
        written = writer.close()
        write_config_json(new_config, tmp)
        copy_support_files(model_dir, tmp)
        if gates is not None:
            from flexo.refit import keep_embedded

            keep_embedded(model_dir, tmp, names)
        meta = dict(src_meta)
        meta.update({
            "experts": kept_names,
            "top_k": top_k,
            **({"top_k_requested": requested_top_k} if requested_top_k != top_k else {}),
            "num_experts": len(keep),
            "packages": {k: v for k, v in (src_meta.get("packages") or {}).items() if k in kept_names},
            "training": {k: v for k, v in (src_meta.get("training") or {}).items() if k in kept_names},
            "opted_out": [*src_meta.get("opted_out", []), *names],
            "opted_out_from": str(model_dir),
            "shards": len(written["files"]),
            "bytes": written["total_size"],
            **({"refitted_without": [*src_meta.get("refitted_without", []), *names]} if gates is not None else {}),
        })
        kept_dp = {k: v for k, v in (src_meta.get("dp") or {}).items() if k in kept_names}
        meta.pop("dp", None)
        if kept_dp:  # the DP record of the experts that remain (flexo/dp.py)
            meta["dp"] = kept_dp
        if warning:
            meta["rerun_needed"] = True
            meta["warning"] = warning
        write_meta(tmp, meta)
        write_model_card(tmp, meta)
    if layout is not None:
        timings.record(layout.root, "opt-out", wall_s=round(time.time() - started, 2))
    log.info("opted out %s: %s → %s (%d experts, top-%d)", names, model_dir, out, len(keep), top_k)
    return meta


# ----------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    """`flexo opt-out --model DIR --exclude NAME [NAME ...] --out DIR`."""
    text = "write a copy of a merged model with some owners' experts removed (strict opt-out)"
    p = subparsers.add_parser("opt-out", help=text, description=text)
    p.add_argument("--model", type=Path, required=True, help="a merged model folder (e.g. models/merged)")
    p.add_argument("--exclude", nargs="+", action="extend", required=True, metavar="NAME",
                   help="owners whose experts are removed")
    p.add_argument("--out", type=Path, required=True, help="the new model folder")

    def run(args) -> dict:
        # Works on any flexo model folder, with or without a project; inside one it uses merge.shard_bytes
        # and never writes into the project's own folders.
        layout, shard_bytes = Layout.at(args.root), DEFAULT_SHARD_BYTES
        if Path(args.params or layout.params).is_file():
            project = Project.from_args(args)
            layout, shard_bytes = project.layout, project.params.merge.shard_bytes
        return opt_out(args.model, args.exclude, args.out, shard_bytes=shard_bytes, layout=layout)

    p.set_defaults(run=run)
