"""Stage `train-expert`: one owner's expert, trained coupled to the frozen public model (FlexOlmo §3.2).

    flexo train-expert --owner math [--no-resume]

Builds the 2-expert model (expert 0 = public FFN, expert 1 = a copy; router rows [r_pub, r_owner] in
every layer; top-2 of 2) and trains only expert 1's FFN — and r_owner too with `train_expert.router:
trained` (the paper's recipe: r_owner starts from the owner's domain embedding). With `router: classifier`
(the default) r_owner = r_pub + w per layer, where w is a logistic regression "own text vs public text"
on the public model's router inputs (flexo/router_fit.py), frozen while the expert trains, so the
expert learns under the routing it will get in the merge (docs/ablation.md has the comparison).
Embeddings, attention, norms and LM head are frozen (requires_grad=False); expert 0 and r_pub share fused tensors with the trainable
slice, so they are frozen by a gradient mask with weight decay 0 and stay bit-identical — checked
before anything is written. Reads only this owner's data plus public artifacts (the public model,
tokenizer, router rows and, for `public_mix`, public text).

With `train_expert.dp.epsilon` > 0 (for this owner) the expert is trained by DP-SGD instead
(flexo/dp.py): (ε, δ)-DP per training document, recorded in expert.json's `dp`.

Writes `models/experts/<owner>/`: `model/` (the owner's full 2-expert model), the expert package
(`expert.safetensors` + `expert.json`) and `loss.csv`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_dir
from flexo.layout import Layout
from flexo.modeling import (
    MODEL_FILES, TORCH_DTYPES, coupled_model, load_config, expert_tensors, fingerprint, load_model, read_meta, read_router_row, write_meta,
)
from flexo.package import PACKAGE_META, PACKAGE_TENSORS, ExpertPackage
from flexo import timings
from flexo.params import PUBLIC, Params
from flexo.project import stage_command
from flexo.router_fit import ROUTER_SUFFIX, domain_classifier, gates, router_inputs
from flexo.ds_backend import select_backend
from flexo.training import Batches, drop_checkpoint, pack, write_loss_log
from flexo.data import curated_manifest, read_split
from flexo.tokenization import load_tokenizer
from flexo.weights import WeightReader


def load_public(layout: Layout, *, verify: bool = True):
    """The public model and its manifest; `verify` recomputes the fingerprint to catch a changed model."""
    meta = read_meta(layout.public_model)
    if verify:
        actual = fingerprint(layout.public_model)
        if actual != meta.get("fingerprint"):
            raise FlexoError(
                f"public model fingerprint mismatch in {layout.public_model}: flexo.json says "
                f"{str(meta.get('fingerprint'))[:12]}…, the weights hash to {actual[:12]}…: rerun `flexo train-public`"
            )
    return load_model(layout.public_model), meta


def owner_trainables(model) -> tuple[dict, dict]:
    """Freeze everything but the MoE tensors; mask index 0 (the public expert and r_pub) out of their grads."""
    trainable, masks = {}, {}
    for name, p in model.named_parameters():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight")):
            mask = torch.ones_like(p)
            mask[0] = 0.0
            trainable[name], masks[name] = p, mask
        else:
            p.requires_grad_(False)
    return trainable, masks


def check_public_parts_unchanged(model, public) -> None:
    """Every frozen tensor, expert 0 and r_pub must equal the public model's bit for bit."""
    pub = public.state_dict()
    for name, t in model.state_dict().items():
        ref = pub[name]
        same = torch.equal(t[:1], ref) if t.shape != ref.shape else torch.equal(t, ref)
        if not same:
            raise FlexoError(f"{name}: the public part moved during owner training (weight decay or mask bug)")


def set_classifier_rows(model, public, own_blocks: torch.Tensor, public_blocks: torch.Tensor, tp) -> list[dict]:
    """r_owner = r_pub + w in every layer, w fitted on the public model's router inputs (own vs public text)."""
    own = router_inputs(public, own_blocks, max_blocks=tp.router_blocks)
    pub = router_inputs(public, public_blocks, max_blocks=tp.router_blocks)
    weights, figures = domain_classifier(own, pub, l2=tp.router_l2, steps=tp.router_steps, lr=tp.router_lr)
    with torch.no_grad():
        for gate, w in zip(gates(model), weights):
            gate.weight[1] = gate.weight[0] + w
    return figures


def package_guard(owner: str) -> OutputGuard:
    """An owner's package folder may replace only an earlier package of the same owner."""
    def same_kind(path: Path) -> bool:
        try:
            return ExpertPackage.read(path, owner=owner).owner == owner
        except FlexoError:
            return False
    files = (PACKAGE_TENSORS, PACKAGE_META, "loss.csv", *(f"model/{f}" for f in MODEL_FILES))
    return OutputGuard(f"expert package of {owner!r}", same_kind, command=f"flexo train-expert --owner {owner}",
                       files=files)


def train_expert(owner: str, params: Params, layout: Layout, *, resume: bool = True, on_step=None) -> dict:
    params.check_owner(owner)
    started = time.time()
    guard = package_guard(owner)
    guard.check(layout.expert(owner))  # before the training, not only before the rename
    tp = params.train_expert
    dp = tp.dp if tp.dp.applies_to(owner) else None
    if dp is not None and (tp.backend == "deepspeed" or (tp.backend == "auto" and torch.cuda.is_available())):
        raise FlexoError(f"train_expert.dp is set for {owner!r} but the DeepSpeed backend has no DP-SGD here: "
                         "set train_expert.backend: torch for DP training")
    tokenizer = load_tokenizer(layout)
    # The router row is checked before any weights load (a wrong width is one line, no loading noise).
    width = load_config(layout.public_model).hidden_size
    r_owner = read_router_row(layout.router_embedding(owner), width)
    public, public_meta = load_public(layout)
    model = coupled_model(public, r_owner)
    trainable, masks = owner_trainables(model)

    data_manifest = curated_manifest(layout, owner)  # checked before any packing or fitting
    seq = params.model.max_seq_len
    train_texts = read_split(layout, owner, "train")
    val_blocks = pack(tokenizer, read_split(layout, owner, "val"), seq, f"{owner} val split")
    if dp is not None:
        return _train_expert_dp(owner, params, layout, model, public, public_meta, tokenizer, trainable, masks,
                                train_texts, val_blocks, data_manifest, guard, started, resume=resume, on_step=on_step)
    train_blocks = pack(tokenizer, train_texts, seq, f"{owner} train split")
    # Public text: in owner batches (`public_mix`) it teaches the expert and a trained r_owner to leave
    # public-like text to the public expert (SPEC §4); the classifier router is fitted against it. It is
    # public data, so the owner's stage still reads no other owner's data.
    public_blocks = None
    if tp.public_mix or tp.router == "classifier":
        public_blocks = pack(tokenizer, read_split(layout, PUBLIC, "train"), seq, "public train split")
    router_figures = None
    if tp.router == "classifier":
        router_figures = set_classifier_rows(model, public, train_blocks, public_blocks, tp)
        for name in [n for n in trainable if n.endswith(ROUTER_SUFFIX)]:
            trainable.pop(name).requires_grad_(False)
            masks.pop(name)
    mix = public_blocks if tp.public_mix else None
    result = select_backend(tp)(
        model, Batches(train_blocks, tp.batch_size, tp.seed, mix, tp.public_mix), val_blocks, tp,
        trainable=trainable, grad_masks=masks, ckpt_dir=layout.checkpoints(f"expert-{owner}"),
        key_parts={"stage": "train_expert", "owner": owner, "public": public_meta["fingerprint"],
                   "data": data_manifest["splits"]["train"]["sha256"]},
        resume=resume, desc=f"train-expert {owner}", on_step=on_step,
    )
    return _write_package(owner, layout, model, public, public_meta, tokenizer, result, data_manifest, guard, started,
                          router=tp.router, router_figures=router_figures, public_mix=tp.public_mix, dp=None)


def _train_expert_dp(owner, params, layout, model, public, public_meta, tokenizer, trainable, masks, train_texts,
                     val_blocks, data_manifest, guard, started, *, resume, on_step) -> dict:
    """The expert by DP-SGD (flexo/dp.py): one example per document, the router row trained inside DP-SGD
    from r_pub (data-independent), `public_mix` public blocks outside the private batches."""
    from flexo.dp import check_delta, document_examples, train_dp
    from flexo.router_stats import owner_secret

    tp, dp = params.train_expert, params.train_expert.dp
    seq = params.model.max_seq_len
    examples = document_examples(tokenizer, train_texts, seq, dp.blocks_per_document)
    check_delta(dp.delta, len(examples), owner)
    with torch.no_grad():  # r_owner = r_pub: the domain embedding was computed from the owner's text outside DP
        for gate in gates(model):
            gate.weight[1] = gate.weight[0]
    public_blocks = None
    if tp.public_mix:
        public_blocks = pack(tokenizer, read_split(layout, PUBLIC, "train"), seq, "public train split")
    result, record = train_dp(
        model, examples, public_blocks, val_blocks, tp, dp, trainable=trainable, grad_masks=masks,
        ckpt_dir=layout.checkpoints(f"expert-{owner}"), secret=owner_secret(layout),
        key_parts={"stage": "train_expert", "owner": owner, "public": public_meta["fingerprint"],
                   "data": data_manifest["splits"]["train"]["sha256"]},
        resume=resume, desc=f"train-expert {owner} (DP ε={dp.epsilon:g})", on_step=on_step)
    return _write_package(owner, layout, model, public, public_meta, tokenizer, result, data_manifest, guard, started,
                          router="trained-dp", router_figures=None, public_mix=tp.public_mix, dp=record.to_dict())


def _write_package(owner, layout, model, public, public_meta, tokenizer, result, data_manifest, guard, started, *,
                   router, router_figures, public_mix, dp) -> dict:
    check_public_parts_unchanged(model, public)
    # The expert is written in the public model's dtype (fp32 for a public model trained here; a converted
    # checkpoint keeps its own, e.g. bf16): the merge needs one dtype, and the public parts round-trip exactly.
    with WeightReader(layout.public_model, "public model") as pub:
        model = model.to(TORCH_DTYPES[pub.dtype("model.layers.0.mlp.gate.weight")])

    out = layout.expert(owner)
    with atomic_dir(out, guard) as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        write_meta(tmp / "model", {"kind": "owner", "experts": [PUBLIC, owner], "top_k": 2,
                                   "fingerprint": public_meta["fingerprint"]})
        cfg = model.config
        meta = {
            "owner": owner,
            "public_fingerprint": public_meta["fingerprint"],
            "num_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "steps": result.steps,
            "tokens_seen": result.tokens,
            "public_mix": public_mix,
            "router": router,
            "router_classifier": router_figures,
            # under DP the training loss of the sampled documents is not released (it is not noised)
            "train_loss": round(result.train_loss, 5) if dp is None else None,
            "val_loss": round(result.val_loss, 5),
            "initial_val_loss": round(result.initial_val_loss, 5),
            "data_manifest_sha256": {s: data_manifest["splits"][s]["sha256"] for s in ("train", "val")},
        }
        if dp is not None:
            meta["dp"] = dp  # absent for a non-DP expert: its expert.json keeps the bytes it always had
        package = ExpertPackage.write(tmp, expert_tensors(model, 1), meta)
        write_loss_log(tmp / "loss.csv", result.log)
    drop_checkpoint(layout.checkpoints(f"expert-{owner}"))
    timings.record(layout.root, f"train-expert@{owner}", wall_s=round(time.time() - started, 1),
                   training=result.speed())
    return package


def add_cli(sub) -> None:
    p = stage_command(sub, "train-expert", "train one owner's expert coupled to the frozen public model",
                      lambda args, project: train_expert(args.owner, project.params, project.layout,
                                                         resume=not args.no_resume),
                      owner="an owner from params.yaml")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint left by an interrupted run")
