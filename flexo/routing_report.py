"""The evaluation's routing analysis: how each model routes every domain's held-out documents.

:func:`routing_analysis` (called by the evaluate stage) routes each domain's held-out test split
(`data/heldout/<domain>/test.jsonl`, never an owner's train or val split) through every evaluated model
with more than one expert and writes `results/routing/<model>.json`, `.md` (tables) and `.png`
(heatmaps domains × experts, per layer and all layers). `model_experts` and `load_routed_model` are
also what `flexo attribute` uses to open a model folder.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import time
from pathlib import Path

from flexo.attribution import plot_routing_heatmap, render_routing_markdown, routing_table
from flexo.errors import FlexoError
from flexo.evaluation import load_tokenizer_for
from flexo.fsutil import atomic_file, write_json
from flexo.layout import Layout
from flexo.modeling import load_config, load_model, read_meta
from flexo.params import PUBLIC, Params

log = logging.getLogger(__name__)

DEFAULT_DOCUMENTS = 20  # documents per domain when evaluate.limit is 0 (routing needs few; it is cheap to read)
DEFAULT_MAX_TOKENS = 256


def routing_file_name(name: str) -> str:
    """`expert:code` → `expert-code` (the same rule as the evaluate stage's file names)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def model_experts(model_dir: Path) -> list[str]:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FlexoError(f"{model_dir} is not a model folder (no config.json): pass a flexo model with --model")
    load_config(model_dir)
    if not (model_dir / "flexo.json").is_file():
        raise FlexoError(f"{model_dir} has no flexo.json, so its experts have no owner names: "
                         "pass a folder written by flexo (train-public, train-expert, merge, opt-out)")
    experts = list(read_meta(model_dir).get("experts") or [])
    if not experts or not all(isinstance(e, str) for e in experts):
        raise FlexoError(f"{model_dir}/flexo.json lists no experts: rerun the stage that wrote the model")
    return experts



def load_routed_model(model_dir: Path, fallback_tokenizer: Path | None = None):
    """(model, tokenizer, expert names) of a flexo model folder, checked against each other."""
    experts = model_experts(model_dir)
    tokenizer = load_tokenizer_for(model_dir, fallback_tokenizer)
    model = load_model(model_dir)
    if model.config.num_experts != len(experts):
        raise FlexoError(f"{model_dir}: flexo.json lists {len(experts)} experts {experts}, the model has "
                         f"{model.config.num_experts}: rerun the stage that wrote it")
    return model, tokenizer, experts


def heldout_texts(layout: Layout, domain: str, limit: int) -> list[str]:
    """The first `limit` documents of a domain's held-out test split (file order, so reruns agree)."""
    f = layout.heldout(domain) / "test.jsonl"
    if not f.is_file() or f.stat().st_size == 0:
        raise FlexoError(f"no held-out test split for {domain!r} ({f}): run `flexo curate --owner {domain}` first")
    texts = []
    with open(f, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FlexoError(f"{f}:{n} is not a JSON object with a 'text' field: rerun "
                                 f"`flexo curate --owner {domain}`") from None
            if isinstance(text, str) and text.strip():
                texts.append(text)
            if len(texts) >= limit:
                break
    return texts


def routing_analysis(params: Params, layout: Layout, models: dict[str, Path], *,
                     documents: int | None = None, max_tokens: int | None = None,
                     domains: list[str] | None = None) -> dict:
    """Route every domain's held-out documents through each model with more than one expert and write
    `results/routing/<model>.{json,md,png}` (:func:`routing_tables` then :func:`write_routing_report`)."""
    tables, skipped = routing_tables(params, layout, models, documents=documents, max_tokens=max_tokens,
                                     domains=domains)
    return write_routing_report(layout, tables, skipped)


def routing_tables(params: Params, layout: Layout, models: dict[str, Path], *,
                   documents: int | None = None, max_tokens: int | None = None,
                   domains: list[str] | None = None) -> tuple[dict[str, dict], dict[str, str]]:
    """({model: routing table over `domains`}, {model: why it was skipped}) — numbers only, so an owner can
    ship its own domain's table (`score@<owner>`) and the centre assemble the report.

    Documents per domain: `documents`, else `evaluate.limit` when > 0, else 20; each truncated to
    `max_tokens` tokens, else `model.max_seq_len` (256 by default). A model folder may be an owner's
    package (its model rebuilt from the public model)."""
    limit = int(documents or params.evaluate.limit or DEFAULT_DOCUMENTS)
    max_tokens = int(max_tokens or params.model.max_seq_len or DEFAULT_MAX_TOKENS)
    domains = domains or [PUBLIC, *params.owners]
    texts = {d: heldout_texts(layout, d, limit) for d in domains}
    tables, skipped = {}, {}
    for name, model_dir in models.items():
        model_dir = Path(model_dir)
        package = not (model_dir / "config.json").is_file() and (model_dir / "expert.json").is_file()
        experts = [PUBLIC, model_dir.name] if package else model_experts(model_dir)
        if len(experts) < 2:
            skipped[name] = f"{len(experts)} expert: nothing to route"
            continue
        started = time.time()
        if package:
            from flexo.modeling import owner_model_from_package

            model, tokenizer = owner_model_from_package(layout.public_model, model_dir), \
                load_tokenizer_for(layout.public_model, layout.tokenizer)
        else:
            model, tokenizer, experts = load_routed_model(model_dir, layout.tokenizer)
        try:
            table = routing_table(model, tokenizer, texts, experts, max_tokens=max_tokens,
                                  batch_size=params.evaluate.batch_size)
        finally:
            del model
            gc.collect()
        shown = model_dir.relative_to(layout.root) if model_dir.is_relative_to(layout.root) else model_dir
        tables[name] = {"model": name, "model_dir": str(shown), "documents_per_domain": limit, **table}
        log.info("routing of %s over %d domains in %.1fs", name, len(domains), time.time() - started)
    return tables, skipped


def merge_routing_tables(parts: list[dict[str, dict]]) -> dict[str, dict]:
    """One table per model from tables over disjoint domains (the centre's public domain and each owner's
    shipped table): the domains side by side, in the order given; a model missing from a part is kept
    with the domains it has."""
    merged: dict[str, dict] = {}
    for part in parts:
        for name, table in part.items():
            if name not in merged:
                merged[name] = {**table, "domains": dict(table["domains"])}
                continue
            mine = merged[name]
            if mine["experts"] != table["experts"]:
                raise FlexoError(f"routing tables of {name!r} name different experts ({mine['experts']} vs "
                                 f"{table['experts']}): rescore with the same models")
            mine["domains"].update(table["domains"])
            mine["top_k"] = max(mine["top_k"], table["top_k"])
    return merged


def write_routing_report(layout: Layout, tables: dict[str, dict], skipped: dict[str, str] | None = None) -> dict:
    """`results/routing/<model>.{json,md,png}` for each table. Returns {"models": {name: {files, experts,
    prob_share per domain}}, "skipped": {name: why}}."""
    out_dir = layout.results / "routing"
    done = {}
    for name, table in tables.items():
        stem = routing_file_name(name)
        files = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
        write_json(files["json"], table)
        with atomic_file(files["md"]) as f:
            f.write(render_routing_markdown(table, title=f"Routing of `{name}` by domain") + "\n")
        plot_routing_heatmap(table, files["png"], title=f"{name}: routing by domain "
                                                        f"(top-{table['top_k']} of {len(table['experts'])} experts)")
        done[name] = {"experts": table["experts"], **{k: str(v) for k, v in files.items()},
                      "prob_share": {d: entry["prob_share"] for d, entry in table["domains"].items()}}
    return {"models": done, "skipped": dict(skipped or {})}
