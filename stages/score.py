"""Stage `score@<owner>`: the owner scores every model of the evaluation on its own held-out text, on its
own machine, and ships only numbers.

    flexo score --owner news [--limit N]

An owner's held-out split is as private as its training text, so nothing but the owner's own stages may
read it. This stage runs where the data is (like `audit@<owner>`, after the merge): it scores every row
of the evaluation's table — public, flexolmo, flexolmo-rt, soup, BTM, every owner's own model (rebuilt
from the public model and the shipped packages where only a package is here) and every opt-out of both
merged models (:mod:`flexo.scoring`) — on `data/heldout/<owner>/test.jsonl`, routes the same documents
through the models with experts (:func:`flexo.routing_report.routing_tables`), and writes
`results/scores/<owner>.json`: bits per byte per model, the routing shares, the settings and the
fingerprints of the models scored, the same for the mixed-domain suite (the owner's held-out text
alternating with public text, :mod:`flexo.mixed`, with a coarse routing trace along one document), and per model 1,000 paired bootstrap replicates of its bits per byte
(flexo.intervals: means over resampled document sets, so that the centre can put a paired interval on
any comparison). Never text, token ids or per-document values. The central
`evaluate` stage assembles the per-domain table from these files and reads no owner's data.
"""

from __future__ import annotations

import time

from flexo import timings
from flexo.errors import FlexoError
from flexo.evaluation import load_tokenizer_for, write_domain_tasks
from flexo.fsutil import write_json
from flexo.layout import Layout
from flexo.mixed import score_mixed
from flexo.params import Params
from flexo.project import stage_command
from flexo.routing_report import routing_tables
from flexo.scoring import SCORES_FORMAT, effective_limit, model_fingerprints, routed_models, score_models


def score(owner: str, params: Params, layout: Layout, *, limit: int | None = None) -> dict:
    """Every model's bits per byte (and routing) on `owner`'s held-out split → results/scores/<owner>.json."""
    params.check_owner(owner)
    started = time.time()
    limit = effective_limit(params, limit)
    if not layout.split_file(owner, "test").is_file():
        raise FlexoError(f"no held-out split of {owner!r} here ({layout.split_file(owner, 'test')}): the score stage "
                         f"runs on {owner}'s machine, after `flexo curate --owner {owner}`")
    fingerprints = model_fingerprints(params, layout)  # before scoring: the scores are bound to these models
    tokenizer = load_tokenizer_for(layout.public_model, layout.tokenizer)
    # The task folder names the owner's file: it stays on this machine, outside every shipped output.
    tasks = layout.root / ".cache" / "score" / owner / "tasks"
    replicates: dict = {}
    bpb, eval_s = score_models(params, layout, [owner], limit=limit, tokenizer=tokenizer,
                               write_tasks=lambda: write_domain_tasks(layout, [owner], tasks), replicates=replicates)
    tables, skipped = routing_tables(params, layout, routed_models(params, layout, list(bpb)), domains=[owner])
    record = {"format": SCORES_FORMAT, "owner": owner, "domain": owner, "limit": limit or 0,
              "max_length": params.evaluate.max_length, "fingerprints": fingerprints,
              "bpb": {m: s[owner] for m, s in bpb.items()}, "routing": tables, "routing_skipped": skipped,
              "bootstrap": {m: r[owner] for m, r in replicates.items()}}
    # The mixed-domain suite: this owner's held-out text alternating with public held-out text (flexo.mixed).
    mixed = score_mixed(owner, params, layout, tokenizer, limit=limit)
    if mixed is not None:
        record["mixed"] = mixed
    write_json(layout.scores(owner), record)
    timings.record(layout.root, f"score@{owner}", wall_s=round(time.time() - started, 1), eval_s=eval_s)
    return {"owner": owner, "scores": str(layout.scores(owner)), "bpb": record["bpb"]}


def add_cli(sub) -> None:
    """`flexo score --owner X [--limit N]`."""
    p = stage_command(sub, "score", "score every model of the evaluation on this owner's held-out split "
                      "(on the owner's machine; ships only numbers: results/scores/<owner>.json)",
                      lambda args, project: score(args.owner, project.params, project.layout, limit=args.limit),
                      owner="the data owner whose held-out split is scored")
    p.add_argument("--limit", type=int, default=None,
                   help="documents of the split; 0 = all (default: evaluate.limit)")
