"""The model card (`README.md`) of every model folder flexo writes after the merge: the experts in router
order, top-k, how to opt one out, and the opt-out guarantee."""

from __future__ import annotations

from pathlib import Path

from flexo.params import PUBLIC

GUARANTEE_NOTE = (
    "The router is softmax over all experts then top-k without renormalisation, so deleting an expert's FFN "
    "and router row (flexo opt-out) or masking its router logit to -inf at serving time computes the same "
    "function as a model that never contained that expert; no retraining is needed."
)



def model_card(meta: dict) -> str:
    """README.md of a merged model: the experts in router order, top-k, and how to opt one out."""
    experts = meta["experts"]
    training = meta.get("training") or {}
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [flexolmo, mixture-of-experts, flexo]",
        "---",
        "",
        f"# FlexOlmo {meta.get('kind', 'merged')} model ({len(experts)} experts, top-{meta['top_k']})",
        "",
        "Built by flexo from a public model and independently trained expert packages (FlexOlmo, "
        "arXiv 2507.07024). A stock `FlexOlmoForCausalLM`: load it with "
        "`AutoModelForCausalLM.from_pretrained(path)`, no custom code. Router: softmax over all experts, "
        "top-k, no renormalisation (`norm_topk_prob: false`), no router bias (the paper's learnable "
        "negative bias is left out so that stock transformers and vLLM load the model).",
        "",
        f"Public model fingerprint: `{meta.get('fingerprint')}`",
        "",
        "| router row | expert | package sha256 | steps | tokens | val loss |",
        "|---|---|---|---|---|---|",
    ]
    for i, name in enumerate(experts):
        if name == PUBLIC:
            lines.append(f"| {i} | public | (public model) | | | |")
            continue
        t = training.get(name, {})
        sha = (meta.get("packages") or {}).get(name, "")
        lines.append(f"| {i} | {name} | `{sha[:16]}` | {t.get('steps', '')} | {t.get('tokens_seen', '')} | "
                     f"{t.get('val_loss', '')} |")
    dp = {k: v for k, v in (meta.get("dp") or {}).items() if k in experts}
    if dp:
        lines += ["", "Differentially private experts (DP-SGD, one training document = the unit; flexo/dp.py): "
                  + "; ".join(f"{k}: (ε = {v['epsilon']:g}, δ = {v['delta']:g}), {v['steps']} steps, noise multiplier "
                              f"{v['noise_multiplier']:.3g}, clip {v['max_grad_norm']:g}" for k, v in dp.items())
                  + ". The other experts are not DP."]
    if meta.get("opted_out"):
        lines += ["", f"Opted out (removed from this model): {', '.join(meta['opted_out'])}."]
    if meta.get("kind") == "merged-rt":
        rt = meta.get("router_tune") or {}
        lines += ["", "Router rows tuned on public proxy data only." if meta.get("tuned")
                  else "Router tuning was disabled: the weights equal the merged model's.",
                  *([f"Router tuning: {rt.get('steps')} steps on {rt.get('proxy_blocks')} blocks."] if rt else [])]
    example = next((e for e in experts if e != PUBLIC), "OWNER")
    lines += [
        "",
        "## Opting an expert out",
        "",
        f"Opt-out guarantee: **{meta.get('opt_out_guarantee')}**. {meta.get('opt_out_note', GUARANTEE_NOTE)}",
        "",
        "A new model folder without the expert (its FFN and router row deleted from every layer):",
        "",
        "```",
        f"flexo opt-out --model <this folder> --exclude {example} --out <new folder>",
        "```",
        "",
        "Or per request at serving time, without a new folder (the expert's router logit masked to -inf):",
        "",
        "```python",
        "from flexo.serving import FlexoServer",
        "server = FlexoServer('<this folder>')",
        f"server.generate('Once upon a time', exclude=['{example}'])",
        f"server.score('Some text.', exclude=['{example}'])",
        "# or, on a loaded model: with flexo.routers.runtime_opt_out(model, experts, ['" + example + "']): ...",
        "```",
        "",
        "Or over HTTP (OpenAI-compatible completions; `exclude` and `attribution` per request, a playground at /):",
        "",
        "```",
        "flexo serve --model <this folder>",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, meta: dict) -> None:
    (Path(folder) / "README.md").write_text(model_card(meta), encoding="utf-8")


