"""Stage `merge`: the public model plus n expert packages → one (1+n)-expert FlexOlmo (FlexOlmo §3.4).

    flexo merge [--public DIR] [--expert DIR ...] [--exclude NAME ...] [--top-k K] [--out DIR]

Shared weights (embeddings, attention, norms, LM head), FFN 0 and the router row r_pub come from the
public model; owner i (in the order given, = params.yaml `owners`) contributes FFN i and router row i of
every layer. No training, no data: the merge reads only the public model folder and the packages.

The manifests, shapes, dtypes, duplicate owners, top-k and exclusions are checked before a byte is
written, each failure a one-line FlexoError. The weights are then streamed in one pass through
`flexo.weights.ShardWriter` as bytes (one tensor in memory at a time, never deserialised; NaN/Inf and
each owner tensor's scale checked on the way through a numpy view; no torch or transformers import)
while a second thread checks every package's sha256 and the public model's
fingerprint; the output folder appears only when all of it passed. The pipeline's merge (default
packages and output) then removes what owners withdrawn from params.yaml left (`flexo.owners`).

The output is a stock transformers folder (`AutoModelForCausalLM.from_pretrained`, no custom code):
config.json, `model.safetensors` or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`
(per-expert keys `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, the form
`save_pretrained` writes), tokenizer and generation config copied from the public folder, `flexo.json`
and a model card `README.md`.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from flexo import timings
from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_dir
from flexo.layout import Layout
from flexo.model_card import GUARANTEE_NOTE, write_model_card
from flexo.model_files import (
    MODEL_FILES, effective_top_k, read_config_json, read_meta, with_experts_json, write_config_json, write_meta,
)
from flexo.owners import prune_withdrawn, withdrawal_plan
from flexo.package import ExpertPackage
from flexo.params import PUBLIC, Params
from flexo.project import stage_command
from flexo.weights import (
    FFN_PARTS, ShardWriter, TensorSpec, WeightReader, all_finite, copy_support_files, fingerprint, float_values, rms,
    shared_keys,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- the checks
def _check_public(public: Path, *, verify: bool = True) -> tuple[dict, dict]:
    """Config and manifest of the public model; `verify` also recomputes its fingerprint (a full read)."""
    public = Path(public)
    if not (public / "config.json").is_file():
        raise FlexoError(f"public model {public} not found (no config.json): run `flexo train-public` first")
    meta = read_meta(public)
    config = read_config_json(public)
    if config["num_experts"] != 1:
        raise FlexoError(f"{public} is not a public model (a 1-expert flex_olmo; it has "
                         f"{config['num_experts']} experts): pass the public model folder with --public")
    if not isinstance(meta.get("fingerprint"), str) or not meta["fingerprint"]:
        raise FlexoError(f"public model {public}: flexo.json has no fingerprint string "
                         f"(got {meta.get('fingerprint')!r}): rerun `flexo train-public`")
    if verify:
        _verify_public(public, meta)
    return config, meta


def _verify_public(public: Path, meta: dict) -> None:
    try:
        actual = fingerprint(public)
    except FlexoError as e:
        raise FlexoError(f"public model {public}: weights unreadable ({e}): rerun `flexo train-public`") from None
    if actual != meta["fingerprint"]:
        raise FlexoError(f"public model {public}: the weights' fingerprint {actual[:12]}… differs from flexo.json's "
                         f"{meta['fingerprint'][:12]}…: the public model changed after it was written; rerun "
                         "`flexo train-public`")


# ------------------------------------------------------------------------------------------ the merge
# A package tensor whose RMS exceeds the public expert's by this factor (or a router row whose norm
# exceeds r_pub's) is not a trained expert but a broken or hostile one: it would take every token (a
# router row) or swamp the residual stream (an FFN). Trained experts start as a copy of the public FFN
# and stay within a few times its scale (tests/test_merge.py measures the tiny project's).
SCALE_BOUND = 1e3


def _record_rms(spec: TensorSpec, into: dict, key: str) -> TensorSpec:
    def check(values: np.ndarray) -> None:
        into[key] = rms(values)
    return replace(spec, check=check)


def _bounded(spec: TensorSpec, reference: dict, key: str, where: str) -> TensorSpec:
    def check(values: np.ndarray) -> None:
        ref, got = reference[key], rms(values)
        if got > SCALE_BOUND * max(ref, 1e-12):
            raise FlexoError(f"{where}: tensor {key} has RMS {got:.3g}, more than {SCALE_BOUND:g}x the public "
                             f"expert's {ref:.3g}: the package is broken or tampered with; retrain or re-export it")
    return replace(spec, check=check)


def _merged_specs(pub: WeightReader, packages: list[tuple[ExpertPackage, WeightReader]], config: dict, dtype: str
                  ) -> Iterator[TensorSpec]:
    """The merged model's tensors in write order (layer after layer). Each owner tensor is checked,
    as it streams, for NaN/Inf and for a scale within SCALE_BOUND of the public expert's same tensor
    (recorded when that one streamed, just before)."""
    head, per_layer, tail = shared_keys(pub)
    for key in head:
        yield pub.spec(key)
    inter, hidden = config["intermediate_size"], config["hidden_size"]
    public_rms: dict[str, float] = {}
    for i in range(config["num_hidden_layers"]):
        for key in per_layer.get(i, []):
            yield pub.spec(key)
        p = f"model.layers.{i}.mlp."
        for part, spec in zip(FFN_PARTS, pub.expert_ffn(i, 0, inter, f"{p}experts.0.")):
            yield _record_rms(spec, public_rms, f"layers.{i}.{part}")
        for e, (package, tensors) in enumerate(packages, start=1):
            for part in FFN_PARTS:
                key = f"layers.{i}.{part}"
                spec = replace(tensors.spec(key, f"{p}experts.{e}.{part}.weight"),
                               origin=f"{package.where}: tensor {key}", fix="retrain it")
                yield _bounded(spec, public_rms, key, package.where)
        gate = f"{p}gate.weight"
        yield TensorSpec(gate, (1 + len(packages), hidden), dtype,
                         lambda gate=gate, i=i: _router_stack(pub, gate, packages, i, dtype))
    for key in tail:
        yield pub.spec(key)


def _norm(raw: np.ndarray, dtype: str) -> float:
    values = float_values(raw, dtype)
    return rms(values) * math.sqrt(values.size)


def _router_stack(pub: WeightReader, key: str, packages: list[tuple[ExpertPackage, WeightReader]], layer: int,
                  dtype: str) -> np.ndarray:
    """Row 0 = r_pub from the public model, row e = owner e's row, bit for bit."""
    r_pub = pub.get_row(key, 0)
    rows = [r_pub]
    bound = SCALE_BOUND * max(_norm(r_pub, dtype), 1e-6)
    for package, tensors in packages:
        row = tensors.get(f"layers.{layer}.router")
        if not all_finite(float_values(row, dtype)):
            raise FlexoError(f"{package.where}: tensor layers.{layer}.router holds NaN or Inf: retrain it")
        norm = _norm(row, dtype)
        if norm > bound:
            raise FlexoError(f"{package.where}: router row of layer {layer} has norm {norm:.3g}, more than "
                             f"{SCALE_BOUND:g}x r_pub's: it would take every token; retrain or re-export the package")
        rows.append(row)
    return np.concatenate(rows)


def merged_model_guard(layout: Layout, inputs: Sequence[Path], *, user_out: bool) -> OutputGuard:
    """What `flexo merge` may replace: an absent folder or an earlier merged model (not an opt-out or a
    tuned one), never an input or, for a user-given --out, a project folder of owners' data or artifacts."""
    def same_kind(path: Path) -> bool:
        meta = _manifest(path)
        return meta.get("kind") == "merged" and "opted_out" not in meta
    return OutputGuard("merged model", same_kind, tuple(inputs), layout.protected() if user_out else (),
                       command="flexo merge", files=MODEL_FILES, user_out=user_out)


def _manifest(folder: Path) -> dict:
    """A model folder's flexo.json, or {} when there is none or it is not a JSON object."""
    try:
        meta = read_meta(folder)
    except FlexoError:
        return {}
    return meta


def merge(params: Params, layout: Layout, *, public: Path | None = None, experts: list[Path] | None = None,
          exclude: Sequence[str] = (), top_k: int | None = None, out: Path | None = None) -> dict:
    """Merge the public model and the expert packages into `out` (default models/merged); returns flexo.json.

    The pipeline's merge (default packages and output) is the fan-in that reruns when `owners` changes:
    after it has succeeded it removes what the owners withdrawn from params.yaml left behind
    (:func:`stages.status.prune_withdrawn`)."""
    started = time.time()
    pipeline_run = experts is None and out is None
    public = Path(public) if public is not None else layout.public_model
    folders = [Path(e) for e in experts] if experts is not None else [layout.expert(o) for o in params.owners]
    top_k = params.merge.top_k if top_k is None else int(top_k)
    guard = merged_model_guard(layout, [public, *folders], user_out=out is not None)
    out = Path(out) if out is not None else layout.merged
    guard.check(out)
    if pipeline_run:
        withdrawal = withdrawal_plan(params, layout)

    # 1. Cheap checks on the manifests: names bound to folders, duplicates, exclusions, top-k.
    packages = [ExpertPackage.read(f, owner=params.owners[i] if experts is None else None)
                for i, f in enumerate(folders)]
    seen: dict[str, Path] = {}
    for package in packages:
        if package.owner in seen:
            raise FlexoError(f"owner {package.owner!r} is given twice ({seen[package.owner]} and {package.folder}): "
                             "pass each owner's package once")
        seen[package.owner] = package.folder
    present = [p.owner for p in packages]
    for name in exclude:
        if name == PUBLIC:
            raise FlexoError("the public expert cannot be excluded (it is expert 0 of every FlexOlmo model): "
                             "exclude owners only")
        if name not in present:
            raise FlexoError(f"cannot exclude {name!r}: it is not among the experts being merged {[PUBLIC, *present]}; "
                             "fix --exclude")
    kept = [p for p in packages if p.owner not in set(exclude)]
    n_experts = 1 + len(kept)
    requested_top_k, top_k = top_k, effective_top_k(top_k, n_experts, "merge")

    # 2. The public model: config, manifest, dtype (its fingerprint is recomputed in step 4).
    config, public_meta = _check_public(public, verify=False)
    public_fp = public_meta["fingerprint"]
    with WeightReader(public, "public model") as pub:
        dtype = pub.dtype("model.layers.0.mlp.gate.weight")

    # 3. Every kept package: fingerprint, names, shapes, dtypes from its header (an excluded one is not read).
    sizes = (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"])
    for package in kept:
        package.check(public_fingerprint=public_fp, sizes=sizes, dtype=dtype)
    merged_config = with_experts_json(config, n_experts, top_k)

    # 4. Stream the weights into a temp folder (NaN/Inf and scale checked per tensor) while a second thread
    #    hashes the inputs; the folder becomes `out` only when both are done and every check passed.
    owners = [p.owner for p in kept]
    with atomic_dir(out, guard) as tmp, ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-verify") as pool:
        checks = [pool.submit(_verify_public, public, public_meta)]
        checks += [pool.submit(package.verify) for package in kept]
        writer = ShardWriter(tmp, params.merge.shard_bytes, what="merge")
        try:
            with WeightReader(public, "public model") as pub:
                sources = [(p, WeightReader(p.folder, p.where, files=[p.tensors]).open()) for p in kept]
                writer.add_all(_merged_specs(pub, sources, config, dtype))
            written = writer.close()
        except (FlexoError, OSError, ValueError, RuntimeError):
            _raise_first_failed(checks)  # a corrupt input explains a failed read better than the read does
            raise
        _raise_first_failed(checks)
        write_config_json(merged_config, tmp)
        copy_support_files(public, tmp)
        meta = {
            "kind": "merged",
            "experts": [PUBLIC, *owners],
            "fingerprint": public_fp,
            "top_k": top_k,
            **({"top_k_requested": requested_top_k} if requested_top_k != top_k else {}),
            "num_experts": n_experts,
            "packages": {p.owner: p.tensors_sha256 for p in kept},
            "opt_out_guarantee": "instant",
            "opt_out_note": GUARANTEE_NOTE,
            "excluded": list(exclude),
            "training": {p.owner: {k: p.meta.get(k) for k in ("steps", "tokens_seen", "public_mix", "train_loss",
                                                               "val_loss", "initial_val_loss")} for p in kept},
            "shards": len(written["files"]),
            "bytes": written["total_size"],
        }
        dp = {p.owner: p.meta["dp"] for p in kept if p.meta.get("dp")}
        if dp:  # which experts are differentially private, and their (ε, δ) as spent (flexo/dp.py)
            meta["dp"] = dp
        write_meta(tmp, meta)
        write_model_card(tmp, meta)
    wall = round(time.time() - started, 2)
    timings.record(layout.root, "merge", wall_s=wall, bytes=written["total_size"])
    log.info("merged %d experts (top-%d) into %s in %.1fs", n_experts, top_k, out, wall)
    if pipeline_run:
        # Only now that the new model is in place: a refused or failed merge deletes nothing.
        removed = prune_withdrawn(layout, withdrawal)
        if removed:
            meta = dict(meta, withdrawn_removed=removed)
    return meta


def _raise_first_failed(checks: list[Future]) -> None:
    for check in checks:
        check.result()  # re-raises the check's FlexoError


# ----------------------------------------------------------------------------------------------- CLI
def add_cli(sub) -> None:
    """`flexo merge [--public DIR] [--expert DIR ...] [--exclude NAME ...] [--top-k K] [--out DIR]`."""
    p = stage_command(sub, "merge", "merge the public model and the owners' expert packages into one FlexOlmo MoE",
                      lambda args, project: merge(project.params, project.layout, public=args.public,
                                                  experts=args.expert, exclude=args.exclude or (),
                                                  top_k=args.top_k, out=args.out))
    p.add_argument("--public", type=Path, default=None, help="public model folder (default: models/public)")
    p.add_argument("--expert", type=Path, nargs="+", action="extend", default=None, metavar="DIR",
                   help="expert package folders in router order (default: models/experts/<owner> for params.yaml owners)")
    p.add_argument("--exclude", nargs="+", action="extend", default=None, metavar="NAME",
                   help="owners to leave out of the merge")
    p.add_argument("--top-k", type=int, default=None, help="experts active per token (default: merge.top_k)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: models/merged)")
