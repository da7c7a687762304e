"""The routing ablation (issue #9): one row per lever and combination, same data, one run.

    make ablation                                   # ≈ 40 min on 2 cores, after `make demo`
    .venv/bin/python experiments/ablation.py --sets classifier+mix,classifier+mix/seed1

Every expert set is trained from scratch in its own project under `.cache/ablation/<set>/`, which
links the demo's curated data, held-out splits, tokenizer and public model (so every set starts from
the same public model and sees the same text), and runs the real stage functions: embed, train-expert,
router-update, merge, router-tune. Each resulting model is scored with lm-eval on the `domains` suite,
exactly like the main table. The default set also gets the baselines the issue compares against
(public, BTM, the per-owner oracle) and both kinds of opt-out of its final model.

Writes results/ablation.json, results/ablation.md and results/ablation.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import yaml  # noqa: E402

from flexo.evaluation import evaluate_model, load_tokenizer_for, write_domain_tasks  # noqa: E402
from flexo.fsutil import atomic_file, write_json  # noqa: E402
from flexo.layout import Layout  # noqa: E402
from flexo.modeling import load_model, read_meta  # noqa: E402
from flexo.params import PUBLIC, as_dict, load_params, params_from_dict  # noqa: E402
from flexo.router_fit import gates, router_inputs  # noqa: E402
from flexo.training import pack, set_threads  # noqa: E402

# Expert sets: overrides of params.yaml. The default (classifier rows, public text in batches) twice.
SETS = {
    "classifier+mix": ("classifier rows + 25% public text (the default)", {}),
    "paper": ("the paper's recipe: r_owner = raw embedder mean, trained with the expert; no public text",
              {"embed": {"row_norm": 0.0}, "train_expert": {"router": "trained", "public_mix": 0.0}}),
    "unit-rows": ("+ router rows scaled to unit norm",
                  {"embed": {"row_norm": 1.0}, "train_expert": {"router": "trained", "public_mix": 0.0}}),
    "unit-rows+mix": ("+ 25% public text in owner batches (the previous default)",
                      {"embed": {"row_norm": 1.0}, "train_expert": {"router": "trained", "public_mix": 0.25}}),
    "classifier": ("classifier rows (own vs public, frozen), no public text in batches",
                   {"train_expert": {"router": "classifier", "public_mix": 0.0}}),
    "classifier+mix/seed1": ("the default, seed 1 (expert data order and the router fit's samples)",
                             {"train_expert": {"seed": 1}, "router_tune": {"seed": 1}}),
}
DEFAULT_SET = "classifier+mix"


def scratch_project(name: str, overrides: dict) -> tuple[object, Layout]:
    """A project folder that shares the demo's public artifacts and data (read-only links)."""
    root = ROOT / ".cache" / "ablation" / name.replace("/", "-")
    for sub in ("data", "models"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for rel in ("data/curated", "data/heldout", "models/public", "models/tokenizer"):
        link = root / rel
        if not link.exists():
            link.symlink_to(ROOT / rel, target_is_directory=True)
    raw = as_dict(load_params(ROOT / "params.yaml"))
    for section, values in overrides.items():
        raw[section].update(values)
    params = params_from_dict(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return params, Layout.at(root)


def train_set(params, layout: Layout) -> dict:
    from stages.embed import embed
    from stages.merge import merge
    from stages.router_update import router_update
    from stages.train_expert import train_expert

    started = time.time()
    for owner in params.owners:
        embed(owner, params, layout)
        train_expert(owner, params, layout, resume=False)
        router_update(owner, params, layout)
    merge(params, layout)
    return {"train_s": round(time.time() - started, 1)}


def tuned(params, layout: Layout, method: str, **extra) -> Path:
    """models/merged-rt of this scratch project, tuned with `method` (written under its own name)."""
    from stages.router_tune import router_tune

    p = copy.deepcopy(params)
    p.router_tune.method = method
    for k, v in extra.items():
        setattr(p.router_tune, k, v)
    router_tune(p, layout)
    dst = layout.root / "models" / f"merged-rt-{method}"
    if dst.exists():
        import shutil

        shutil.rmtree(dst)
    layout.merged_rt.rename(dst)
    return dst


@torch.no_grad()
def negative_bias(model_dir: Path, layout: Layout, params, bias: float) -> torch.nn.Module:
    """The paper's negative owner bias carried into the bias-free router: each owner row's difference to
    r_pub is made orthogonal to the public model's mean router input μ, then given `bias` along μ, so that
    on a typical token its logit is r_pub's + bias. (Post hoc; the paper learns b during training.)"""
    public = load_model(layout.public_model)
    tok = load_tokenizer_for(layout.public_model, layout.tokenizer)
    from flexo.data import read_split

    blocks = pack(tok, read_split(layout, PUBLIC, "train"), params.model.max_seq_len, "public")
    mus = [h.mean(0) for h in router_inputs(public, blocks, max_blocks=params.router_tune.stats_documents)]
    model = load_model(model_dir)
    for gate, mu in zip(gates(model), mus):
        unit = mu / mu.norm()
        diff = gate.weight[1:] - gate.weight[0]
        diff = diff - (diff @ unit)[:, None] * unit[None] + bias / mu.norm() * unit[None]
        gate.weight[1:] = gate.weight[0] + diff
    return model


class Scorer:
    def __init__(self, params, layout: Layout, domains: list[str]):
        self.params, self.domains = params, domains
        self.tasks = write_domain_tasks(layout, domains, ROOT / ".cache" / "ablation" / "tasks")
        self.tokenizer = load_tokenizer_for(layout.public_model, layout.tokenizer)

    def __call__(self, model) -> dict[str, float]:
        ev = self.params.evaluate
        scores = evaluate_model(model, self.tokenizer, self.tasks, limit=None, batch_size=ev.batch_size,
                                max_length=ev.max_length, domains=self.domains)
        owners = [d for d in self.domains if d != PUBLIC]
        out = {d: round(scores[d], 4) for d in self.domains}
        out["avg"] = round(sum(scores[d] for d in owners) / len(owners), 4)
        return out


def run(sets: list[str]) -> dict:
    set_threads()
    main = load_params(ROOT / "params.yaml")
    domains = [PUBLIC, *main.owners]
    # Rows of sets not rerun now are kept from the last report (each set's rows come from one run).
    previous = ROOT / "results" / "ablation.json"
    rows: list[dict] = []
    if previous.is_file():
        rows = [r for r in json.loads(previous.read_text()).get("rows", []) if r["set"] not in sets]
    report = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__}
    scorer = None

    def add(set_name: str, lever: str, model, **extra):
        t0 = time.time()
        scores = scorer(model)
        rows.append({"set": set_name, "lever": lever, "bpb": scores, "eval_s": round(time.time() - t0, 1), **extra})
        print(f"[ablation] {set_name:22s} {lever:46s} " + " ".join(f"{d} {v:.3f}" for d, v in scores.items()),
              flush=True)

    for name in sets:
        text, overrides = SETS[name]
        params, layout = scratch_project(name, overrides)
        scorer = scorer or Scorer(params, layout, domains)
        timing = train_set(params, layout)
        add(name, f"{text} — plain merge", layout.merged, **timing)
        add(name, "+ federated router fit (owners' statistics)", tuned(params, layout, "federated"))
        if name == "unit-rows+mix":
            add(name, "+ proxy router tuning (public look-alikes)", tuned(params, layout, "proxy"))
            add(name, "+ negative bias −1 along the public mean", negative_bias(layout.merged, layout, params, -1.0))
        if name == DEFAULT_SET:
            baselines(params, layout, add, rows, name)
        write_report(report)
    report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_report(report)
    return report


def baselines(params, layout: Layout, add, rows: list[dict], name: str) -> None:
    """Public, BTM and the oracle on this set's experts; both kinds of opt-out of the tuned model."""
    from flexo.baselines import BTMLM
    from flexo.routers import runtime_opt_out
    from stages.merge import merge
    from stages.router_tune import fit_federated

    add(name, "baseline: public model", layout.public_model)
    members = [load_model(layout.public_model)] + [load_model(layout.expert(o) / "model") for o in params.owners]
    add(name, "baseline: BTM", BTMLM(members, tokenizer=load_tokenizer_for(layout.public_model, layout.tokenizer),
                                     names=[PUBLIC, *params.owners], batch_size=params.evaluate.batch_size,
                                     max_length=params.evaluate.max_length))
    del members
    # The oracle is not one model: each owner domain scored by that owner's own model.
    own = {o: score_one_domain(layout, params, layout.expert(o) / "model", o) for o in params.owners}
    rows.append({"set": name, "lever": "baseline: oracle (each domain by its owner's model)",
                 "bpb": {**own, "avg": round(sum(own.values()) / len(own), 4)}})
    tuned_dir = layout.root / "models" / "merged-rt-federated"
    experts = read_meta(tuned_dir)["experts"]
    model = load_model(tuned_dir)
    for o in params.owners:
        with runtime_opt_out(model, experts, [o]):
            add(name, f"fitted router, {o} masked at run time", model, opt_out=o, kind="runtime")
    # The honest opt-out of a federated fit: merge and fit again without the owner (seconds).
    for o in params.owners:
        p = copy.deepcopy(params)
        p.owners = [x for x in params.owners if x != o]
        merge(p, layout)
        fit_federated(p, layout)
        add(name, f"fitted router, {o} withdrawn (merge + fit rerun)", layout.merged_rt, opt_out=o, kind="rerun")
    merge(params, layout)  # leave the full merge in place


def score_one_domain(layout: Layout, params, model_dir: Path, domain: str) -> float:
    tasks = write_domain_tasks(layout, [domain], ROOT / ".cache" / "ablation" / f"tasks-{domain}")
    scores = evaluate_model(model_dir, load_tokenizer_for(layout.public_model, layout.tokenizer), tasks, limit=None,
                            batch_size=params.evaluate.batch_size, max_length=params.evaluate.max_length,
                            domains=[domain])
    return round(scores[domain], 4)


def write_report(report: dict) -> None:
    rows = report["rows"]
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    write_json(out / "ablation.json", dict(report, rows=rows))
    domains = [d for d in (PUBLIC, *load_params(ROOT / "params.yaml").owners)]
    lines = [f"# Routing ablation ({report['started']}, {report['machine']}, torch {report['torch']})", "",
             "Bits per byte on each domain's held-out test split (lm-eval `loglikelihood_rolling`, the main "
             "table's suite); `avg` = mean over the owner domains. Every set trains its own experts from the "
             "same public model and data (experiments/ablation.py).", "",
             "| set | lever | " + " | ".join(domains) + " | avg |", "|---|---|" + "---:|" * (len(domains) + 1)]
    for r in rows:
        cells = [f"{r['bpb'][d]:.3f}" if d in r["bpb"] else "" for d in domains]
        lines.append(f"| {r['set']} | {r['lever']} | " + " | ".join(cells) + f" | {r['bpb']['avg']:.3f} |")
    with atomic_file(out / "ablation.md") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, out / "ablation.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if "opt_out" not in r]
    if not main:
        return
    labels = [f"{r['set']}: {r['lever'][:48]}" for r in main]
    values = [r["bpb"]["avg"] for r in main]
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(main) + 1.2))
    colors = ["#888888" if r["lever"].startswith("baseline") else "#3b75af" for r in main]
    ax.barh(range(len(main)), values, color=colors)
    ax.set_yticks(range(len(main)), labels, fontsize=7)
    ax.invert_yaxis()
    lo = min(values) * 0.97
    ax.set_xlim(lo, max(values) * 1.01)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=7)
    ax.set_xlabel("bits per byte, mean over owner domains (lower is better)")
    ax.set_title("Routing ablation")
    fig.tight_layout()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {list(SETS)}")
    a = ap.parse_args()
    chosen = [s.strip() for s in a.sets.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SETS]
    if bad:
        sys.exit(f"ablation: unknown set(s) {bad}: choose from {list(SETS)}")
    run(chosen)
