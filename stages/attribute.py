"""`flexo attribute`: which owners' experts a text is routed to; and the evaluation's routing analysis.

    flexo attribute --model models/merged --text "def f(x): return x"
    flexo attribute --model models/merged --file doc.txt --exclude news --json

prints each expert's share of the routing of the text (mean router probability, applied top-k gate
share, top-1 share; overall and per layer: see :mod:`flexo.attribution`), with the experts named in
`--exclude` masked at run time exactly as `FlexoServer` serves a request that opts them out (they get 0).
Works on any flexo model folder (public, an owner's model, merged, an opted-out copy).

:func:`routing_analysis` is called by the evaluate stage: for every evaluated model with more than one
expert it routes each domain's held-out test split (`data/heldout/<domain>/test.jsonl`, never an
owner's train or val split) and writes `results/routing/<model>.json`, `.md` (tables) and `.png`
(heatmaps domains × experts, per layer and all layers).
"""

from __future__ import annotations

import gc
import json
import logging
import re
import time
from pathlib import Path

from flexo.errors import FlexoError
from flexo.fsutil import atomic_file, write_json
from flexo.layout import Layout
from flexo.params import PUBLIC, Params

log = logging.getLogger(__name__)

DEFAULT_DOCUMENTS = 20  # documents per domain when evaluate.limit is 0 (routing needs few; it is cheap to read)
DEFAULT_MAX_TOKENS = 256


def routing_file_name(name: str) -> str:
    """`expert:code` → `expert-code` (the same rule as the evaluate stage's file names)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def _model_experts(model_dir: Path) -> list[str]:
    from flexo.modeling import load_config, read_meta

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


def _load(model_dir: Path, fallback_tokenizer: Path | None = None):
    from flexo.evaluation import load_tokenizer_for
    from flexo.modeling import load_model

    experts = _model_experts(model_dir)
    tokenizer = load_tokenizer_for(model_dir, fallback_tokenizer)
    model = load_model(model_dir)
    if model.config.num_experts != len(experts):
        raise FlexoError(f"{model_dir}: flexo.json lists {len(experts)} experts {experts}, the model has "
                         f"{model.config.num_experts}: rerun the stage that wrote it")
    return model, tokenizer, experts


def _check_exclude(experts: list[str], exclude: list[str], model_dir: Path) -> list[str]:
    names = list(dict.fromkeys(exclude))
    for name in names:
        if name == PUBLIC:
            raise FlexoError("the public expert cannot be excluded (it is expert 0 of every FlexOlmo model)")
        if name not in experts:
            raise FlexoError(f"cannot exclude {name!r}: the experts of {model_dir} are {experts}")
    return names


def _read_text(args) -> str:
    if args.text is not None:
        text = args.text
    else:
        path = Path(args.file)
        if path.is_dir():
            raise FlexoError(f"--file {path} is a folder, not a file: pass a UTF-8 text file")
        if path.exists() and not path.is_file():
            raise FlexoError(f"--file {path} is not a regular file (a device or a pipe): pass a UTF-8 text file")
        if not path.is_file():
            raise FlexoError(f"--file {path} does not exist: pass a UTF-8 text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FlexoError(f"--file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise FlexoError("nothing to attribute: the text is empty")
    return text


def attribute_cli(model_dir: Path, text: str, exclude: list[str] = ()) -> dict:
    """What `flexo attribute` computes, as a dict (Attribution.to_dict plus the model folder)."""
    from flexo.attribution import attribute_request

    experts = _model_experts(model_dir)  # cheap checks before loading weights
    names = _check_exclude(experts, list(exclude), model_dir)
    model, tokenizer, experts = _load(model_dir)
    a = attribute_request(model, tokenizer, text, experts, names)
    return {"model": str(model_dir), **a.to_dict(), "_render": a.render()}


def _cmd_attribute(args):
    text = _read_text(args)
    result = attribute_cli(Path(args.model), text, args.exclude or [])
    rendered = result.pop("_render")
    if args.json:
        return result
    return f"model: {result['model']}\n{rendered}"


def add_cli(subparsers) -> None:
    """`flexo attribute --model DIR (--text TEXT | --file FILE) [--json] [--exclude NAME ...]`."""
    text = "show which owners' experts a text is routed to (shares of routing weight, overall and per layer)"
    p = subparsers.add_parser("attribute", help=text, description=text)
    p.add_argument("--model", type=Path, required=True, help="a flexo model folder (e.g. models/merged)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", default=None, help="the text to attribute")
    src.add_argument("--file", type=Path, default=None, help="a UTF-8 text file to attribute")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--exclude", nargs="+", action="extend", default=None, metavar="NAME",
                   help="owners masked at run time for this request (as the server's per-request opt-out)")
    p.set_defaults(fn=_cmd_attribute)


# ------------------------------------------------------------------------------------ routing analysis
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
    `results/routing/<model>.{json,md,png}`. Returns {"models": {name: {files, experts, prob_share per
    domain}}, "skipped": {name: why}}.

    Documents per domain: `documents`, else `evaluate.limit` when > 0, else 20; each truncated to
    `max_tokens` tokens, else `model.max_seq_len` (256 by default)."""
    from flexo.attribution import plot_routing_heatmap, render_routing_markdown, routing_table

    limit = int(documents or params.evaluate.limit or DEFAULT_DOCUMENTS)
    max_tokens = int(max_tokens or params.model.max_seq_len or DEFAULT_MAX_TOKENS)
    domains = domains or [PUBLIC, *params.owners]
    texts = {d: heldout_texts(layout, d, limit) for d in domains}
    out_dir = layout.results / "routing"
    done, skipped = {}, {}
    for name, model_dir in models.items():
        model_dir = Path(model_dir)
        experts = _model_experts(model_dir)
        if len(experts) < 2:
            skipped[name] = f"{len(experts)} expert: nothing to route"
            continue
        started = time.time()
        model, tokenizer, experts = _load(model_dir, layout.tokenizer)
        try:
            table = routing_table(model, tokenizer, texts, experts, max_tokens=max_tokens,
                                  batch_size=params.evaluate.batch_size)
        finally:
            del model
            gc.collect()
        table = {"model": name, "model_dir": str(model_dir), "documents_per_domain": limit, **table}
        stem = routing_file_name(name)
        files = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
        write_json(files["json"], table)
        with atomic_file(files["md"]) as f:
            f.write(render_routing_markdown(table, title=f"Routing of `{name}` by domain") + "\n")
        plot_routing_heatmap(table, files["png"], title=f"{name}: routing by domain "
                                                        f"(top-{table['top_k']} of {len(experts)} experts)")
        log.info("routing of %s over %d domains in %.1fs", name, len(domains), time.time() - started)
        done[name] = {"experts": experts, **{k: str(v) for k, v in files.items()},
                      "prob_share": {d: table["domains"][d]["prob_share"] for d in domains}}
    return {"models": done, "skipped": skipped}
