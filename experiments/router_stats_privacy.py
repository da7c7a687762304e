"""Private, bounded router statistics: what (ε, δ)-DP and a low-rank form cost the default model.

    make privacy-stats                                    # ≈ 1 h on 2 busy cores, after `make demo`
    .venv/bin/python experiments/router_stats_privacy.py --epsilons inf,8,2,1,0.5 --ranks 0,64,16

For every (ε, r) — ε = router_tune.dp_epsilon (inf = no DP), r = router_tune.stats_rank (0 = the full
covariance) — each owner's statistics are made exactly as `flexo router-update` would make them
(`flexo.router_stats.summarize` with the same clip norms, δ, noise multiplier, secret and noise key),
written to a temp folder as the owner would ship them (their size is the bytes per owner), read back
and checked as `flexo router-tune` reads them (`read_update`, `check_stats_scale`), fitted with
router_tune's settings by the centre's own code (`stages.router_tune.fit_rows_into`) into an in-memory
copy of models/merged, and scored on every owner's held-out test split by the evaluation's own lm-eval
path (`flexo.evaluation.evaluate_model`, evaluate.batch_size and max_length), as `flexo score` scores
flexolmo-rt. The expensive part, every owner's router inputs on its own train text, is computed once; a
configuration costs a summary, a fit and an evaluation (2–5 min on 2 busy cores, the evaluation most).

The configuration params.yaml's router_tune gives (dp_epsilon 0 = inf, stats_rank) is the demo's default
model: its statistics must equal models/router_updates/ and its router rows models/merged-rt's bit for bit,
and its avg owner bpb results/metrics.json's flexolmo-rt (or, where that has no owner average,
models/merged-rt scored here); all three are checked and printed. Cells show the change vs (inf, full).
Rows of configurations left out of --epsilons/--ranks are kept from the last report.

Reads the demo's outputs, every owner's train and held-out text in one process (a diagnostic, which
the pipeline never does); writes docs/router_stats_privacy.{json,md} (or --out) and nothing under models/
or results/. It creates the owners' DP secret (.cache/dp-secret) if absent, as `flexo router-update`
does under DP, so the noise is the noise the stage would add on this machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flexo and stages, installed or not

import torch
from safetensors.torch import load_file, save_file

from flexo.data import curated_manifest, read_split
from flexo.errors import FlexoError
from flexo.evaluation import (
    default_device,
    evaluate_model,
    load_tokenizer_for,
    write_domain_tasks,
)
from flexo.fsutil import atomic_file, write_json
from flexo.layout import Layout
from flexo.modeling import load_model, load_tokenizer_from, read_meta, safetensors_files
from flexo.package import ExpertPackage
from flexo.params import PUBLIC, load_params
from flexo.router_fit import ROUTER_SUFFIX, check_stats_scale, gates
from flexo.router_stats import (
    Privacy,
    achieved_epsilon,
    calibrate,
    clip_norms,
    document_features,
    owner_secret,
    public_stats,
    read_update,
    summarize,
    update_name,
)
from flexo.training import set_threads
from stages.router_tune import fit_rows_into

ROOT = Path(__file__).resolve().parents[1]
NAME = "router_stats_privacy"
STATS_FORMAT = {"format": "flexo-router-stats-v2"}  # the metadata `flexo router-update` writes
REPRODUCE_TOLERANCE = 1e-4  # bits per byte


# ------------------------------------------------------------------------------------- the owners
class Owner:
    """One owner's router inputs on its own train text (computed once) and how the stage keys its noise."""

    def __init__(self, owner: str, params, layout: Layout):
        rt = params.router_tune
        model_dir = layout.expert(owner) / "model"
        package = ExpertPackage.read(layout.expert(owner), owner=owner)
        # As stages/router_update.py: the owner's own model on the first stats_documents train documents.
        model = load_model(model_dir)
        tokenizer = load_tokenizer_from(model_dir, fix=f"rerun `flexo train-expert --owner {owner}`")
        self.features, self.doc_index = document_features(model, tokenizer, read_split(layout, owner, "train"),
                                                          max_tokens=params.model.max_seq_len,
                                                          max_documents=rt.stats_documents)
        del model
        self.name, self.public_fingerprint = owner, package.public_fingerprint
        self.exact = summarize(self.features, self.doc_index)  # what the demo ships (no DP, full covariances)
        self.documents = int(self.doc_index.max()) + 1
        data_sha = curated_manifest(layout, owner)["splits"]["train"]["sha256"]
        self.what = f"{owner}:{data_sha}:{package.tensors_sha256}"  # the stage's noise key

    def ship(self, rank: int, privacy: Privacy | None, secret: bytes, folder: Layout) -> int:
        """Write what the owner would ship with (rank, privacy) into `folder`'s router_updates; its bytes."""
        stats = summarize(self.features, self.doc_index, rank=rank, privacy=privacy,
                          secret=secret if privacy else b"", what=self.what)
        out = folder.router_update(self.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(stats, str(out), metadata=STATS_FORMAT)
        # The fields of the stage's manifest that the centre reads (read_update).
        write_json(out.with_suffix(".json"), {"owner": self.name, "method": "federated", "rank": rank,
                                              "public_fingerprint": self.public_fingerprint,
                                              "dp": privacy.record() if privacy else None})
        return out.stat().st_size


# ------------------------------------------------------------------------------------- the run
def parse_epsilon(text: str) -> float:
    value = float(text)
    if not (value > 0):
        raise argparse.ArgumentTypeError(f"ε must be > 0 or inf, got {text}")
    return value


def run(epsilons: list[float], ranks: list[int], root: Path, out: Path) -> dict:
    set_threads()
    started = time.time()
    layout = Layout.at(root)
    params = load_params(layout.params)
    rt = params.router_tune
    require_demo(layout, list(params.owners))
    meta = read_meta(layout.merged)
    owners = [e for e in meta["experts"] if e != PUBLIC]
    # Every owner's domain (the figure is their average; the public domain is left out to save time).
    domains = owners
    report = {"date": datetime.now(UTC).strftime("%Y-%m-%d"),
              "started": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, device {default_device()}",
              "command": " ".join(["python", f"experiments/{NAME}.py", *sys.argv[1:]]),
              "versions": versions(), "git": git_commit(),
              "settings": {"owners": owners, "domains": domains, "delta": rt.dp_delta, "dp_clip": rt.dp_clip,
                           "stats_documents": rt.stats_documents, "max_tokens_per_document": params.model.max_seq_len,
                           "fit": {"samples": rt.fit_samples, "steps": rt.fit_steps, "lr": rt.fit_lr,
                                   "l2": rt.fit_l2, "seed": rt.seed},
                           "evaluate": {"batch_size": params.evaluate.batch_size,
                                        "max_length": params.evaluate.max_length, "limit": params.evaluate.limit}},
              "configurations": []}
    # Rows of configurations not rerun now are kept from the last report (as experiments/ablation.py keeps its
    # sets), marked with the run they come from.
    grid = {(_label(e), r) for e in epsilons for r in ranks}
    last_file = out / f"{NAME}.json"
    if last_file.is_file():
        last = json.loads(last_file.read_text())
        report["configurations"] = [dict(r, run_started=r.get("run_started", last["started"]))
                                    for r in last.get("configurations", []) if (r["epsilon"], r["rank"]) not in grid]
        if report["configurations"]:
            report["earlier_runs"] = last.get("earlier_runs", []) + [
                {"started": last["started"], "command": last["command"], "git": last["git"]}]
        report["reproduction"] = {k: v for k, v in (last.get("reproduction") or {}).items()
                                  if isinstance(v, dict) and k not in {_key(*c) for c in grid}}

    model = load_model(layout.merged)
    layers, hidden = len(gates(model)), model.config.hidden_size
    if any(r >= hidden for r in ranks):  # as `flexo router-update` refuses router_tune.stats_rank ≥ width
        raise SystemExit(f"{NAME}: error: every rank must be below the model width {hidden} (0 = full), got {ranks}")
    t0 = time.time()
    people = [Owner(o, params, layout) for o in owners]
    public = public_stats(params, layout)
    clip = clip_norms(params, layout) if any(math.isfinite(e) for e in epsilons) else []
    secret = owner_secret(layout) if clip else b""
    report["features_s"] = round(time.time() - t0, 1)
    report["documents"] = {p.name: p.documents for p in people}
    report["tokens"] = {p.name: len(p.doc_index) for p in people}
    print(f"[privacy] router inputs of {owners} and the public class in {report['features_s']} s", flush=True)

    tokenizer = load_tokenizer_for(layout.public_model, layout.tokenizer)
    # Inside the project, as lm-eval asks git for the commit of the folder it runs in (the task folder).
    (layout.root / ".cache").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="privacy-stats-", dir=layout.root / ".cache") as tmp:
        tasks = write_domain_tasks(layout, domains, Path(tmp) / "tasks")
        shipped = Layout.at(Path(tmp) / "owners")  # what the owners ship, one configuration at a time
        # The demo's own configuration first: a failed reproduction shows before the rest is spent.
        demo = (_label(rt.dp_epsilon if rt.dp_epsilon > 0 else math.inf), rt.stats_rank)
        for eps, rank in sorted(((e, r) for e in epsilons for r in ranks),
                                key=lambda c: ((_label(c[0]), c[1]) != demo, -c[0])):
            row = configuration(eps, rank, people, public, clip, secret, shipped, model, tokenizer, tasks,
                                params, meta, domains, layers, hidden)
            report["configurations"].append(dict(row, run_started=report["started"]))
            if (row["epsilon"], rank) == demo:
                report.setdefault("reproduction", {})[_key(*demo)] = same_as_demo(layout, model, people, shipped)
            write(report, out)
        # Its bpb at the end: a demo's evaluation still running at the start may have finished meanwhile.
        if demo in grid and _key(*demo) in report.get("reproduction", {}):
            row = next(r for r in report["configurations"] if (r["epsilon"], r["rank"]) == demo)
            report["reproduction"][_key(*demo)].update(same_bpb_as_demo(layout, row, tokenizer, tasks, params, owners))
    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["wall_s"] = round(time.time() - started, 1)
    write(report, out)
    return report


def configuration(eps: float, rank: int, people: list[Owner], public, clip, secret, shipped: Layout, model,
                  tokenizer, tasks: Path, params, meta: dict, domains: list[str], layers: int, hidden: int) -> dict:
    rt = params.router_tune
    t0 = time.time()
    row: dict = {"epsilon": _label(eps), "rank": rank}
    privacy, sigma = None, None
    if math.isfinite(eps):
        # calibrate() needs δ below 1/documents: the smallest owner decides (all owners have the same here).
        sigma = calibrate(eps, rt.dp_delta, min(p.documents for p in people))
        privacy = Privacy(eps, rt.dp_delta, clip, params.model.max_seq_len, sigma)
        row.update(noise_multiplier=round(sigma, 6), noise_std=round(sigma * REPLACE_ONE * math.sqrt(2 * layers + 1), 6),
                   achieved_epsilon=round(achieved_epsilon(sigma, rt.dp_delta), 6))
    row["bytes"] = {p.name: p.ship(rank, privacy, secret, shipped) for p in people}
    try:
        updates = [read_update(shipped, p.name, meta.get("fingerprint"), layers, hidden)[0] for p in people]
        for p, update in zip(people, updates):
            check_stats_scale(update, public, layers, update_name(shipped, p.name))
        # On the CPU, as `flexo router-tune` fits (the evaluation below may move the model to a GPU).
        figures = fit_rows_into(model.cpu(), [public, *updates], [PUBLIC, *[p.name for p in people]], rt)
    except FlexoError as e:  # what `flexo router-tune` would refuse: recorded, not scored
        row.update(refused=str(e), wall_s=round(time.time() - t0, 1))
        print(f"[privacy] ε {row['epsilon']} r {rank or 'full'}: refused: {e}", flush=True)
        return row
    row["statistics_error"] = statistics_error(people, updates)
    row["fit"] = [{"loss": f["loss"], "sample_recall": f["sample_recall"]} for f in figures]
    scores = evaluate_model(model.to(default_device()), tokenizer, tasks, limit=params.evaluate.limit or None,
                            batch_size=params.evaluate.batch_size, max_length=params.evaluate.max_length,
                            domains=domains)
    owners = [d for d in domains if d != PUBLIC]
    row["bpb"] = {d: round(scores[d], 6) for d in domains}
    row["avg_owner_bpb"] = round(sum(scores[d] for d in owners) / len(owners), 6)
    row["wall_s"] = round(time.time() - t0, 1)
    noise = f", σ {sigma:.3f}, achieved ε {row['achieved_epsilon']}" if privacy else ""
    print(f"[privacy] ε {row['epsilon']} r {rank or 'full'}: avg owner bpb {row['avg_owner_bpb']:.4f}, "
          f"{max(row['bytes'].values())} bytes per owner{noise} ({row['wall_s']} s)", flush=True)
    return row


def statistics_error(people: list[Owner], updates: list[dict]) -> dict:
    """Mean over owners and layers of the relative error of what the centre read vs the exact statistics
    (mean: L2; covariance: Frobenius): how much DP noise and the low-rank form moved them."""
    mean_err, cov_err = [], []
    for p, update in zip(people, updates):
        for layer in range(len(p.features)):
            mean, cov = (p.exact[f"layers.{layer}.{k}"].double() for k in ("mean", "cov"))
            mean_err.append(float((update[f"layers.{layer}.mean"].double() - mean).norm() / mean.norm()))
            cov_err.append(float((update[f"layers.{layer}.cov"].double() - cov).norm() / cov.norm()))
    return {"mean": round(sum(mean_err) / len(mean_err), 4), "cov": round(sum(cov_err) / len(cov_err), 4)}


def same_as_demo(layout: Layout, model, people: list[Owner], shipped: Layout) -> dict:
    """Right after the fit of the configuration params.yaml gives (the demo's own): are the statistics the
    owners shipped here models/router_updates/' and the router rows models/merged-rt's, bit for bit?"""
    out: dict = {}
    try:
        out["statistics_equal_demo"] = all(
            _same(load_file(layout.router_update(p.name)), load_file(shipped.router_update(p.name))) for p in people)
        demo_rows = {}
        for f in safetensors_files(layout.merged_rt):
            demo_rows.update({k: v for k, v in load_file(f).items() if k.endswith(ROUTER_SUFFIX)})
        ours = {k: v.cpu() for k, v in model.state_dict().items() if k.endswith(ROUTER_SUFFIX)}
        out["router_rows_equal_demo"] = ours.keys() == demo_rows.keys() and all(
            torch.equal(ours[k], demo_rows[k]) for k in ours)
    except (FlexoError, OSError, ValueError) as e:  # e.g. a `dvc repro` rewriting the demo's outputs meanwhile
        out["error"] = f"{type(e).__name__}: {e}"
    print(f"[privacy] the demo's configuration vs models/: {out}", flush=True)
    return out


def same_bpb_as_demo(layout: Layout, row: dict, tokenizer, tasks: Path, params, owners: list[str]) -> dict:
    """The demo configuration's avg owner bpb vs results/metrics.json's flexolmo-rt, or, where that has no
    owner average, models/merged-rt scored here as the evaluation scores it."""
    metrics_file = layout.results / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        demo = (metrics.get("avg_owner_bpb") or {}).get("flexolmo-rt")
        source = "results/metrics.json"
        if demo is None:
            scores = evaluate_model(layout.merged_rt, tokenizer, tasks, limit=params.evaluate.limit or None,
                                    batch_size=params.evaluate.batch_size, max_length=params.evaluate.max_length,
                                    domains=owners)
            demo = round(sum(scores[d] for d in owners) / len(owners), 6)
            source = "models/merged-rt scored here (results/metrics.json has no flexolmo-rt owner average)"
    except (FlexoError, OSError, ValueError) as e:
        return {"bpb_error": f"{type(e).__name__}: {e}"}
    out = {"demo_source": source, "demo_avg_owner_bpb": demo, "avg_owner_bpb": row.get("avg_owner_bpb")}
    if row.get("avg_owner_bpb") is not None:
        out["difference"] = round(row["avg_owner_bpb"] - demo, 6)
        out["reproduced"] = abs(out["difference"]) <= REPRODUCE_TOLERANCE
    print(f"[privacy] the demo's configuration: avg owner bpb {out['avg_owner_bpb']}, the demo's flexolmo-rt {demo} "
          f"({source}): difference {out.get('difference')}", flush=True)
    if out.get("reproduced") is not True:
        print(f"[privacy] WARNING: the demo's configuration does not reproduce the demo to {REPRODUCE_TOLERANCE}",
              flush=True)
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def require_demo(layout: Layout, owners: list[str]) -> None:
    """One line and exit 2 unless the demo's models and results are here (nothing is written before)."""
    need = [layout.public_model / "config.json", layout.merged / "config.json", layout.merged_rt / "flexo.json",
            *(layout.expert(o) / "model" / "config.json" for o in owners),
            *(layout.router_update(o).with_suffix(".json") for o in owners),
            *(layout.split_file(o, "test") for o in owners)]
    missing = [str(p.relative_to(layout.root)) for p in need if not p.is_file()]
    if missing:
        raise SystemExit(f"{NAME}: error: {missing[0]} is missing ({len(missing)} demo outputs in all): run "
                         "`make demo` first")
    if (read_meta(layout.merged_rt).get("router_tune") or {}).get("method") != "federated":
        raise SystemExit(f"{NAME}: error: models/merged-rt is not the federated router fit: set "
                         "router_tune.method: federated in params.yaml and run `make demo`")


def versions() -> dict:
    return {p: md.version(p) for p in ("torch", "transformers", "dp-accounting", "lm_eval", "safetensors")}


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


# ------------------------------------------------------------------------------------- the report
READING = "\n## Reading\n"


def write(report: dict, out: Path) -> None:
    """The JSON and the markdown tables; a "## Reading" section already in the markdown (written by a
    person) is kept."""
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / f"{NAME}.md"
    old = md_path.read_text() if md_path.is_file() else ""
    reading = old[old.index(READING):] if READING in old else ""
    write_json(out / f"{NAME}.json", report)
    with atomic_file(md_path) as f:
        f.write(render(report) + reading)


def _key(eps, rank: int) -> str:
    """A configuration's name in the report: "inf/0", "8.0/64"."""
    return f"{eps}/{rank}"


def _label(eps: float) -> float | str:
    """ε as the JSON report keeps it: a number, or "inf" (no DP)."""
    return "inf" if math.isinf(eps) else eps


def _eps_label(eps) -> str:
    return "∞ (no DP)" if eps == "inf" else f"{eps:g}"


def _rank_label(rank: int) -> str:
    return "full" if rank == 0 else f"r = {rank}"


def render(report: dict) -> str:
    rows = report["configurations"]
    epsilons = sorted({r["epsilon"] for r in rows}, key=lambda e: -float(e))  # ∞ first
    ranks = sorted({r["rank"] for r in rows}, key=lambda r: -math.inf if r == 0 else -r)  # full first
    cell = {(r["epsilon"], r["rank"]): r for r in rows}
    base = cell.get(("inf", 0), {}).get("avg_owner_bpb")
    s = report["settings"]
    documents = ", ".join(f"{o} {n}" for o, n in report["documents"].items())
    earlier = sorted({r["run_started"] for r in rows if r.get("run_started", report["started"]) != report["started"]})
    lines = [f"# Private, bounded router statistics ({report['date']})", "",
             f"- command: `{report['command']}`",
             (f"- started {report['started']}, finished {report.get('finished', '(running)')}, "
              f"wall {report.get('wall_s', '-')} s; {report['machine']}"),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"- git: {report['git']}",
             *[f"- rows kept from an earlier run: `{r['command']}`, started {r['started']}, git {r['git']}"
               for r in report.get("earlier_runs", []) if r["started"] in earlier],
             "",
             ("Average bits per byte over the owner domains' held-out test splits (lm-eval, the main table's "
              "suite) of the default model (the federated router fit on models/merged) when every owner ships "
              f"its router statistics (ε, δ = {s['delta']:g})-DP per document and in rank-r form; in parentheses "
              "the change vs no DP and full covariances (positive = worse). Documents summarised per owner: "
              f"{documents} (first {s['max_tokens_per_document']} tokens each); clip norm {s['dp_clip']} × the "
              "public model's median router-input norm."), "",
             "| ε \\ r | " + " | ".join(map(_rank_label, ranks)) + " | noise multiplier σ | achieved ε |",
             "|---|" + "---:|" * (len(ranks) + 2)]
    for eps in epsilons:
        cells = []
        for r in ranks:
            c = cell.get((eps, r))
            if c is None:
                cells.append("")
            elif "refused" in c:
                cells.append("refused by router-tune")
            else:
                delta = f" ({c['avg_owner_bpb'] - base:+.3f})" if base is not None else ""
                cells.append(f"{c['avg_owner_bpb']:.3f}{delta}")
        first = next((cell[(eps, r)] for r in ranks if (eps, r) in cell), {})
        sigma = f"{first['noise_multiplier']:.3f}" if "noise_multiplier" in first else "—"
        achieved = f"{first['achieved_epsilon']:.3f}" if "achieved_epsilon" in first else "—"
        lines.append(f"| {_eps_label(eps)} | " + " | ".join(cells) + f" | {sigma} | {achieved} |")
    size = [max(cell[(epsilons[0], r)]["bytes"].values()) if (epsilons[0], r) in cell else None for r in ranks]
    lines.append("| bytes per owner | " + " | ".join(f"{b:,}" if b else "" for b in size) + " | | |")
    lines += ["", ("σ: the Gaussian noise multiplier dp_accounting calibrates to (ε, δ) for one release; the noise "
                   "std on every coordinate of the normalised sums is σ·√(2L + 1) (L layers: the first and second "
                   "moments of every layer and the token count in one release). Achieved ε: the RDP accountant's ε "
                   "for that σ at δ. Bytes: the safetensors file an owner ships "
                   "(models/router_updates/<owner>.safetensors), the same for every ε and owner."), "",
              ("Relative error of the statistics the centre reads vs the exact ones (mean over owners and layers; "
               "mean L2 / covariance Frobenius):"), "",
              "| ε \\ r | " + " | ".join(map(_rank_label, ranks)) + " |", "|---|" + "---:|" * len(ranks)]
    for eps in epsilons:
        errors = [cell.get((eps, r), {}).get("statistics_error") for r in ranks]
        lines.append(f"| {_eps_label(eps)} | "
                     + " | ".join(f"{e['mean']:.3g} / {e['cov']:.3g}" if e else "" for e in errors) + " |")
    refused = [c for c in rows if "refused" in c]
    if refused:
        lines += ["", "Refused by `flexo router-tune`:", ""]
        lines += [f"- ε {_eps_label(c['epsilon'])}, {_rank_label(c['rank'])}: {c['refused']}" for c in refused]
    for key, rep in (report.get("reproduction") or {}).items():
        eps, rank = key.split("/")
        checks = []
        if "router_rows_equal_demo" in rep:
            checks.append(f"the statistics equal models/router_updates/ bit for bit: {rep['statistics_equal_demo']}; "
                          f"the router rows equal models/merged-rt's: {rep['router_rows_equal_demo']}")
        if "demo_avg_owner_bpb" in rep:
            checks.append(f"avg owner bpb {rep['avg_owner_bpb']} vs the demo's flexolmo-rt {rep['demo_avg_owner_bpb']} "
                          f"({rep['demo_source']}), difference {rep.get('difference')}")
        checks += [f"not checked: {rep[k]}" for k in ("error", "bpb_error") if k in rep]
        lines += ["", (f"Reproduction of the demo (router_tune as params.yaml had it: ε "
                       f"{_eps_label(eps if eps == 'inf' else float(eps))}, {_rank_label(int(rank))}): "
                       + "; ".join(checks) + ".")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", default="inf,8,2,1,0.5", help="comma-separated ε values; inf = no DP")
    ap.add_argument("--ranks", default="0,64,16", help="comma-separated ranks; 0 = the full covariance")
    ap.add_argument("--root", type=Path, default=ROOT, help="project root holding the demo's outputs")
    ap.add_argument("--out", type=Path, default=None, help="folder of the report (default: <root>/docs)")
    a = ap.parse_args()
    try:
        epsilons = [parse_epsilon(e) for e in a.epsilons.split(",") if e.strip()]
        ranks = [int(r) for r in a.ranks.split(",") if r.strip()]
    except (ValueError, argparse.ArgumentTypeError) as e:
        ap.error(str(e))
    if any(r < 0 for r in ranks):
        ap.error("ranks must be ≥ 0 (0 = the full covariance)")
    out = (a.out or a.root / "docs").resolve()
    run(epsilons, ranks, a.root.resolve(), out)
    print((out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
