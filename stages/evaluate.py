"""Stage `evaluate`: bits-per-byte of every model on every domain's held-out test split, with lm-eval.

    flexo evaluate                                  # the DVC stage: every model, tables and figures
    flexo evaluate --model DIR [--limit N]          # one model folder on the domains suite
    (the paper's 31-task suite is the `benchmark` stage: stages/benchmark.py)

The DVC stage evaluates, on the public domain and every owner's domain (`data/heldout/<name>/test.jsonl`
only — never an owner's train or val split):

- `public`: the public model; `flexolmo`: the merged model (`models/merged`); `flexolmo-rt`: the
  router-tuned one (`models/merged-rt`, when it exists and was tuned);
- with `evaluate.baselines`: `soup` (the average of all expert FFNs in one dense model), `btm` (the
  posterior-weighted ensemble of the public model and every owner's own model, see
  :mod:`flexo.baselines`), `expert:<owner>` (each owner's own 2-expert model) and `optout:<owner>`
  (the merged model with that owner's router logit masked to −inf in every layer at run time: the
  model is loaded once and each opt-out is a mask, :func:`flexo.routers.runtime_opt_out`).
  BTM runs first and records each member's own document log-likelihoods; the `public` and
  `expert:<owner>` rows replay those (lm-eval still scores them) rather than running each model twice.

Writes `results/metrics.json` (DVC metrics: `bpb` {model: {domain: bits-per-byte}}, `avg_owner_bpb`
{model: mean over owner domains, when any owner's held-out split is here}; run times go to
.cache/timings.jsonl, not into DVC-hashed files), `results/table.md` (best per column in bold), `results/bpb.png`, `results/optout.md` + `results/optout.png` (each opt-out's change vs the full
merged model), lm-eval's raw results per model in `results/lm_eval/<model>.json` and the generated task
folder `results/tasks/domains/`. Every file is written to a temp name and renamed. A `--model` run writes
its raw results to `results/adhoc/` and touches none of the stage's outputs.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from flexo.evaluation import domains_tasks_dir, evaluate_model, load_tokenizer_for, write_domain_tasks
from flexo.fsutil import atomic_file, atomic_path, write_json
from flexo.layout import Layout
from flexo.mixed import mixed_report
from flexo import timings
from flexo.params import PUBLIC, Params
from flexo.project import stage_command
from flexo.routing_report import merge_routing_tables, routing_tables, write_routing_report
from flexo.scoring import (
    effective_limit, model_fingerprints, model_file_name, read_scores, require_model, routed_models, score_models,
)

log = logging.getLogger(__name__)

AVG = "avg (owners)"


# ------------------------------------------------------------------------------------------- the stage
def evaluate(params: Params, layout: Layout, *, model: Path | None = None, limit: int | None = None) -> dict:
    """Evaluate one model folder (`model`) or, with none, every model of the pipeline (the DVC stage)."""
    limit = effective_limit(params, limit)
    if model is not None:
        return _evaluate_one(params, layout, Path(model), available_domains(params, layout), limit)
    return _evaluate_all(params, layout, limit)


def available_domains(params: Params, layout: Layout) -> list[str]:
    """`public` plus every owner whose held-out split is here. A central clone has none of the owners'
    (their data stays with them: `push: false`), so it evaluates on public data only."""
    domains = [PUBLIC]
    for owner in params.owners:
        if layout.split_file(owner, "test").is_file():
            domains.append(owner)
        else:
            log.warning("no held-out split for owner %s here (owner data stays with its owner): "
                        "evaluating without that domain", owner)
    return domains


def _evaluate_one(params: Params, layout: Layout, model_dir: Path, domains: list[str], limit: int | None) -> dict:
    started = time.time()
    model_dir = require_model(model_dir, "model", "train-public")
    tokenizer = load_tokenizer_for(model_dir, layout.tokenizer)
    tasks_dir = write_domain_tasks(layout, domains, domains_tasks_dir(layout))
    raw = layout.results / "adhoc" / f"{model_file_name(model_dir.resolve().name)}.domains.json"
    scores = evaluate_model(model_dir, tokenizer, tasks_dir, limit=limit, batch_size=params.evaluate.batch_size,
                            max_length=params.evaluate.max_length, raw_out=raw)
    owners = [d for d in domains if d != PUBLIC]
    return {"model": str(model_dir), "suite": "domains", "limit": limit or 0,
            "bpb": {d: round(v, 6) for d, v in scores.items()},
            "avg_owner_bpb": round(_mean([scores[d] for d in owners]), 6) if owners else None,
            "lm_eval_results": str(raw), "wall_s": round(time.time() - started, 1)}  # printed, not written


def _evaluate_all(params: Params, layout: Layout, limit: int | None) -> dict:
    """The public domain scored here; every owner's domain from the scores it shipped (`score@<owner>`)."""
    started = time.time()
    ev = params.evaluate
    require_model(layout.public_model, "public model", "train-public")
    fingerprints = model_fingerprints(params, layout)
    tokenizer = load_tokenizer_for(layout.public_model, layout.tokenizer)
    replicates: dict = {}
    bpb, eval_s = score_models(params, layout, [PUBLIC], limit=limit, tokenizer=tokenizer,
                               write_tasks=lambda: write_domain_tasks(layout, [PUBLIC], domains_tasks_dir(layout)),
                               raw_dir=layout.results / "lm_eval", replicates=replicates)
    shipped = {}
    for owner in params.owners:
        rec = read_scores(layout, owner, rows=list(bpb), fingerprints=fingerprints, limit=limit,
                          max_length=ev.max_length)
        if rec is None:
            log.warning("no scores from owner %s (results/scores/%s.json): its domain is left out; it runs "
                        "`flexo score --owner %s` on its machine", owner, owner, owner)
            continue
        shipped[owner] = rec
        for m in bpb:
            bpb[m][owner] = round(float(rec["bpb"][m]), 6)
            replicates[m][owner] = rec["bootstrap"][m]
    owners = list(shipped)
    domains = [PUBLIC, *owners]
    metrics = {"bpb": bpb, "limit": limit or 0, "max_length": ev.max_length, "domains": domains,
               "public_only": not owners, "scored_by_owners": owners}
    if owners:  # no NaN in metrics (not JSON): without an owner's scores there is no owner average
        metrics["avg_owner_bpb"] = {m: round(_mean([s[d] for d in owners]), 6) for m, s in bpb.items()}
    metrics["comparisons"] = comparisons(bpb, replicates, owners or [PUBLIC])

    out = layout.results
    # Raw results of models no longer in the plan (a withdrawn owner, baselines turned off) would be stale.
    keep = {f"{model_file_name(m)}.json" for m in bpb}
    for stale in (out / "lm_eval").glob("*.json"):
        if stale.name not in keep:
            stale.unlink()
    write_json(out / "metrics.json", metrics)
    with atomic_file(out / "table.md") as f:
        f.write(render_table(bpb, domains, owners, limit=limit, max_length=ev.max_length,
                             dp=_dp_experts(layout)))
        f.write("\n" + render_comparisons(metrics["comparisons"], owners))
    optout = {m: s for m, s in bpb.items() if m.startswith("optout:")}
    optout_rt = {m: s for m, s in bpb.items() if m.startswith("optout-rt:")}
    with atomic_file(out / "optout.md") as f:
        f.write(render_optout(optout, bpb["flexolmo"], domains, owners))
        if optout_rt:  # the default model: each opt-out refits the router rows without that owner (exact)
            f.write("\n### The default model (flexolmo-rt), router rows refitted without the owner\n\n"
                    + render_optout(optout_rt, bpb["flexolmo-rt"], domains, owners).split("\n\n", 1)[1]
                    .replace("| flexolmo |", "| flexolmo-rt |"))
    plot_bpb(out / "bpb.png", bpb, domains, owners)
    mixed = mixed_report(shipped, out)  # the mixed-domain suite, from what the owners shipped
    if mixed is not None:
        metrics["mixed"] = mixed
    plot_optout(out / "optout.png", optout, bpb["flexolmo"], domains)
    # Which expert each domain's tokens go to, layer by layer: the public domain routed here, each owner's
    # domain from the table it shipped.
    tables, skipped = routing_tables(params, layout, routed_models(params, layout, list(bpb)), domains=[PUBLIC])
    tables = merge_routing_tables([tables, *[{m: t for m, t in rec["routing"].items() if m in tables}
                                              for rec in shipped.values()]])
    metrics["routing"] = _routing_summary(write_routing_report(layout, tables, skipped))
    write_json(out / "metrics.json", metrics)
    timings.record(layout.root, "evaluate", wall_s=round(time.time() - started, 1), eval_s=eval_s)
    metrics["outputs"] = [str(out / n) for n in ("metrics.json", "table.md", "bpb.png", "optout.md", "optout.png",
                                                 "routing", *(("mixed.md", "mixed_routing.png") if mixed else ()))]
    return metrics


# The comparisons the README states (a, b): a − b of the mean bits per byte over the owner domains, with a
# paired bootstrap interval; lower is better. Rows missing from the plan (baselines off) are skipped.
COMPARISONS = (("flexolmo", "public"), ("flexolmo-rt", "public"), ("flexolmo-rt", "flexolmo"), ("flexolmo", "btm"),
               ("flexolmo-rt", "btm"), ("btm", "soup"), ("soup", "public"), ("flexolmo", "soup"),
               ("flexolmo", "prompt-routing"), ("flexolmo-rt", "prompt-routing"), ("soup-weighted", "soup"),
               ("btm-top2", "btm"))


def comparisons(bpb: dict[str, dict[str, float]], replicates: dict[str, dict[str, list[float]]],
                domains: list[str]) -> dict:
    """{"a - b": {"mean": the owner average's comparison, "domains": {domain: that domain's}}}."""
    from flexo.intervals import paired

    out = {}
    for a, b in COMPARISONS:
        if a in bpb and b in bpb:
            args = ((a, b), bpb[a], bpb[b], replicates[a], replicates[b])
            out[f"{a} - {b}"] = {"mean": paired(*args, domains),
                                 "domains": {d: paired(*args, [d]) for d in domains}}
    return out


def render_comparisons(comps: dict, owners: list[str]) -> str:
    if not comps:
        return ""
    where = f"the mean over the owner domains ({', '.join(owners)})" if owners else "the public domain"
    lines = [f"Paired comparisons on {where}: a − b in bits per byte (negative = a better), its 95% paired bootstrap "
             "interval (1,000 resamples of each domain's documents, the same documents for both models) and what "
             "it shows; per domain in results/metrics.json.", "",
             "| a − b | difference | relative | 95% interval | reading |", "|---|---:|---:|---|---|"]
    for pair, c in comps.items():
        m = c["mean"]
        lines.append(f"| {pair} | {m['diff']:+.4f} | {100 * m['relative']:+.2f}% | "
                     f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}] | {m['shown']} |")
    return "\n".join(lines) + "\n"


def _routing_summary(analysis: dict) -> dict:
    """Per model and domain: the mean routing probability of each expert over all layers."""
    return {model: {d: {e: round(v, 4) for e, v in shares.items()} for d, shares in row["prob_share"].items()}
            for model, row in analysis.get("models", {}).items()}


# ------------------------------------------------------------------------------------------- reports
def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _dp_experts(layout: Layout) -> dict:
    """{owner: its DP record} of the merged model's differentially private experts (flexo/dp.py)."""
    from flexo.model_files import read_meta

    return read_meta(layout.merged).get("dp") or {} if (layout.merged / "flexo.json").is_file() else {}


def render_table(bpb: dict[str, dict[str, float]], domains: list[str], owners: list[str], *,
                 limit: int | None, max_length: int, dp: dict | None = None) -> str:
    """Markdown: rows = models, columns = domains + the mean over owner domains (when any owner's held-out
    split is here); best per column bold."""
    cols = [*domains, AVG] if owners else list(domains)
    rows = {m: [s[d] for d in domains] + ([_mean([s[d] for d in owners])] if owners else []) for m, s in bpb.items()}
    best = [min(round(r[i], 3) for r in rows.values()) for i in range(len(cols))]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m, r in rows.items():
        cells = [f"**{v:.3f}**" if round(v, 3) == best[i] else f"{v:.3f}" for i, v in enumerate(r)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    docs = f"the first {limit} documents" if limit else "all documents"
    caption = (
        f"Bits per byte (lower is better) on each domain's held-out test split ({docs} of "
        "`data/heldout/<domain>/test.jsonl`), measured with lm-eval `loglikelihood_rolling` in rolling windows of "
        f"{max_length} tokens; **bold** = best in the column; "
        + (f"`{AVG}` = mean over the owner domains ({', '.join(owners)}). " if owners else
           "every column is public text: no owner's held-out split is here (it stays with its owner), so the "
           "owner domains are not scored on this machine. ")
        + "public = the public dense model; flexolmo = the merged MoE (-rt: router-tuned); "
        "soup = all expert FFNs averaged into one dense model (-weighted: per document, weighted by the prompt "
        "classifier); btm = posterior-weighted ensemble of the public model and every owner's model (-top2: only the "
        "2 members with the highest posterior after 32 tokens); prompt-routing = each document scored by the one "
        "model (public or an owner's) a classifier on the first router layer picks from its first 32 tokens; expert:X = owner X's own 2-expert model; optout:X = the merged model "
        "with X's expert masked out at run time."
    )
    if dp:
        caption += (" Differentially private experts (DP-SGD): "
                    + ", ".join(f"{o} (ε = {r['epsilon']:g}, δ = {r['delta']:g})" for o, r in dp.items())
                    + "; the other experts are not DP.")
    return caption + "\n\n" + "\n".join(lines) + "\n"


def render_optout(optout: dict[str, dict[str, float]], full: dict[str, float], domains: list[str],
                  owners: list[str]) -> str:
    head = ("Opt-out: bits per byte of the merged model with one owner's expert masked out at run time, and "
            "in parentheses the change vs the full merged model (positive = worse). An opted-out owner's own "
            "domain is expected to get worse and the others to change little.\n\n")
    if not optout:
        return head + "No opt-out was evaluated (`evaluate.baselines: false`).\n"
    avg_col = f" | {AVG} |" if owners else " |"
    lines = ["| model | " + " | ".join(domains) + avg_col, "|---|" + "---:|" * (len(domains) + bool(owners))]
    full_avg = _mean([full[d] for d in owners])
    lines.append("| flexolmo | " + " | ".join(f"{full[d]:.3f}" for d in domains)
                 + (f" | {full_avg:.3f} |" if owners else " |"))
    for m, s in optout.items():
        avg = _mean([s[d] for d in owners])
        cells = [f"{s[d]:.3f} ({s[d] - full[d]:+.3f})" for d in domains]
        cells += [f"{avg:.3f} ({avg - full_avg:+.3f})"] if owners else []
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_bpb(path: Path, bpb: dict[str, dict[str, float]], domains: list[str], owners: list[str]) -> None:
    """Grouped bars: one group per domain (+ the owner average), one bar per model."""
    plt = _pyplot()
    groups = [*domains, AVG] if owners else list(domains)
    models = list(bpb)
    values = {m: [bpb[m][d] for d in domains] + ([_mean([bpb[m][d] for d in owners])] if owners else [])
              for m in models}
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(groups) * max(1, len(models)) * 0.35 + 2), 4.5))
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(models):
        xs = [g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values[m], width=width, label=m, color=cmap(i % 20))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("Held-out bits per byte by domain")
    ax.legend(fontsize=8, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_optout(path: Path, optout: dict[str, dict[str, float]], full: dict[str, float], domains: list[str]) -> None:
    """For each opted-out owner, the change in bits per byte on every domain vs the full merged model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(domains) + 2), 4.0))
    if not optout:
        ax.text(0.5, 0.5, "no opt-out evaluated (evaluate.baselines: false)", ha="center", va="center")
        ax.set_axis_off()
    else:
        width = 0.8 / len(optout)
        cmap = plt.get_cmap("tab10")
        for i, (m, s) in enumerate(optout.items()):
            xs = [g + (i - (len(optout) - 1) / 2) * width for g in range(len(domains))]
            ax.bar(xs, [s[d] - full[d] for d in domains], width=width, label=m, color=cmap(i % 10))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(domains)), domains)
        ax.set_ylabel("Δ bits per byte vs merged (positive = worse)")
        ax.set_title("Opt-out: change per domain when one owner's expert is masked")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- CLI


def add_cli(sub) -> None:
    """`flexo evaluate [--model DIR] [--limit N]`."""
    p = stage_command(sub, "evaluate", "evaluate models with lm-eval: bits per byte on every domain's held-out test "
                      "split (no --model: every pipeline model and baseline, tables and figures in results/)",
                      lambda args, project: evaluate(project.params, project.layout, model=args.model,
                                                     limit=args.limit))
    p.add_argument("--model", type=Path, default=None,
                   help="evaluate only this model folder (raw results go to results/adhoc/)")
    p.add_argument("--limit", type=int, default=None,
                   help="documents (or items) per task; 0 = all (default: evaluate.limit)")
