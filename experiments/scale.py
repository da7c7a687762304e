"""The demo at a larger scale, beside the demo itself (issue 21): does the method's shortfall here come
from scale or from its design?

    .venv/bin/python experiments/scale.py run configs/scale4x.yaml     # ~2 h on 2 cores, in the background
    .venv/bin/python experiments/scale.py render                       # docs/scale.md from what has run

`run` builds a scratch project under .cache/scale/<preset>/ (a copy of the tracked files, the preset as its
params.yaml, its own DVC cache), runs the pipeline up to the evaluation (`dvc repro evaluate`: the audits
are not needed here) and then the routing-ceiling analysis (experiments/routing_ceiling.py) inside it, and
keeps the figures in docs/scale/<preset>/. The scratch project runs its own copy of the code (PYTHONPATH),
so editing this checkout while it trains changes nothing in the run. Rerunning resumes: DVC skips what is
done and training resumes from its checkpoints.

`render` writes docs/scale.md: the demo's figures (results/metrics.json, docs/routing_ceiling.json) and
each preset's, side by side, under the prediction that was written before the first run.
"""

from __future__ import annotations

import argparse
import re
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "scale"
KEPT = ("results/metrics.json", "results/table.md", "results/routing_ceiling.json", "results/routing_ceiling.md",
        "models/public/flexo.json", "params.yaml")


def scratch_env(project: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(project)  # the scratch copy of flexo/ and stages/, not this checkout's
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"
    env.setdefault("FLEXO_DOWNLOADS", str(ROOT / ".cache" / "downloads"))  # the registry packages, fetched once
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
                 "DS_ACCELERATOR": "cpu", "HF_HOME": str(project / ".cache" / "hf")}.items():
        env[k] = v
    return env


def prepare(config: Path, project: Path) -> None:
    """A copy of the tracked files with the preset as params.yaml (kept if the project exists: resume)."""
    if not (project / "dvc.yaml").is_file():
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
        tmp = project.with_name(project.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel in files.decode().split("\0"):
            if rel and (ROOT / rel).is_file() and rel != "dvc.lock":
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, tmp / rel)
        shutil.rmtree(tmp / ".dvc", ignore_errors=True)
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp, check=True, env=scratch_env(tmp))
        subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=tmp, check=True, env=scratch_env(tmp))
        tmp.rename(project)
    shutil.copy2(config, project / "params.yaml")


def run(config: Path) -> None:
    name = config.stem
    project = ROOT / ".cache" / "scale" / name
    project.parent.mkdir(parents=True, exist_ok=True)
    prepare(config, project)
    env = scratch_env(project)
    check = subprocess.run([sys.executable, "-c", "import flexo; print(flexo.__file__)"], cwd=project, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert check.startswith(str(project)), f"the scratch project would run {check}, not its own copy"
    started = time.time()
    print(f"[scale] {name}: dvc repro evaluate in {project}", flush=True)
    subprocess.run(["dvc", "repro", "evaluate"], cwd=project, env=env, check=True)
    pipeline_s = time.time() - started
    print(f"[scale] {name}: routing ceiling", flush=True)
    subprocess.run([sys.executable, "experiments/routing_ceiling.py"], cwd=project, env=env, check=True)
    out = DOCS / name
    out.mkdir(parents=True, exist_ok=True)
    for rel in KEPT:
        shutil.copy2(project / rel, out / Path(rel).name)
    wall = {"pipeline_s": round(pipeline_s), "total_s": round(time.time() - started),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": f"{os.cpu_count()} cores"}
    (out / "wall.json").write_text(json.dumps(wall, indent=2) + "\n")
    print(f"[scale] {name}: done in {wall['total_s'] / 60:.0f} min; figures in {out.relative_to(ROOT)}", flush=True)


def demo() -> None:
    """The demo's own figures beside the presets': its routing ceiling rerun with today's code (`make ceiling`
    reads the demo's models) and the same files kept in docs/scale/demo/."""
    subprocess.run([sys.executable, "experiments/routing_ceiling.py"], cwd=ROOT, check=True)
    out = DOCS / "demo"
    out.mkdir(parents=True, exist_ok=True)
    for rel in KEPT:
        shutil.copy2(ROOT / rel, out / Path(rel).name)


# ------------------------------------------------------------------------------------------ intervals
RESAMPLES = 2000


def document_figures(project: Path) -> dict:
    """Per owner: each held-out document's bytes and its NLL (nats) under the public model, the plain merge,
    the federated fit and the owner's own model (the oracle row), from that project's models."""
    sys.path.insert(0, str(ROOT))
    from experiments.dp_experts import document_nats
    from flexo.layout import Layout
    from flexo.modeling import load_model
    from flexo.params import load_params
    from flexo.tokenization import load_tokenizer

    layout = Layout.at(project)
    params = load_params(layout.params)
    tok = load_tokenizer(layout)
    out = {}
    for owner in params.owners:
        texts = [json.loads(line)["text"] for line in open(layout.heldout(owner) / "test.jsonl")]
        models = {"public": layout.public_model, "flexolmo": layout.merged, "flexolmo-rt": layout.merged_rt,
                  "oracle": layout.expert(owner) / "model"}
        out[owner] = {"bytes": [len(t.encode()) for t in texts],
                      "sha256": [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts],
                      "nats": {k: document_nats(load_model(p).eval(), tok, texts, params.evaluate.max_length)
                               for k, p in models.items()}}
        print(f"[scale] {project.name}: {owner} scored ({len(texts)} documents)", flush=True)
    return out


def shares(figs: dict, idx: dict) -> dict:
    """Avg owner bpb of each model over the documents `idx` (per owner), and the share of the public → oracle
    gain each model leaves (the table's definition: the mean over owners of each domain's bpb)."""
    import numpy as np

    bpb = {}
    for m in ("public", "flexolmo", "flexolmo-rt", "oracle"):
        per_owner = [np.asarray(f["nats"][m])[idx[o]].sum() / np.asarray(f["bytes"])[idx[o]].sum() / np.log(2)
                     for o, f in figs.items()]
        bpb[m] = float(np.mean(per_owner))
    gain = bpb["public"] - bpb["oracle"]
    return {"bpb": bpb, **{f"share:{m}": (bpb[m] - bpb["oracle"]) / gain for m in ("flexolmo", "flexolmo-rt")}}


def intervals(figures: dict[str, dict]) -> dict:
    """95% bootstrap intervals (documents resampled within each owner) of each size's shares of the gain left
    by the plain merge and the federated fit, and of their change from the demo to each preset: paired
    (the same resampled documents) when both sizes scored the same held-out documents, else independent."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    sizes = list(figures)
    same_docs = all(figures[s][o]["sha256"] == figures[sizes[0]][o].get("sha256") for s in sizes for o in figures[s])
    boots = {s: [] for s in sizes}
    for _ in range(RESAMPLES):
        draw = None
        for s in sizes:
            if draw is None or not same_docs:
                draw = {o: rng.integers(0, len(f["bytes"]), len(f["bytes"])) for o, f in figures[s].items()}
            boots[s].append(shares(figures[s], draw))
    keys = ["share:flexolmo", "share:flexolmo-rt"]
    for s in sizes:
        full = shares(figures[s], {o: np.arange(len(f["bytes"])) for o, f in figures[s].items()})
        out[s] = {"documents": {o: len(f["bytes"]) for o, f in figures[s].items()},
                  "bpb": {m: round(v, 4) for m, v in full["bpb"].items()}}
        for k in keys:
            vals = [b[k] for b in boots[s]]
            out[s][k] = {"value": round(full[k], 4), "ci95": [round(float(np.percentile(vals, q)), 4) for q in (2.5, 97.5)]}
    for s in sizes[1:]:
        for k in keys:
            diffs = [b[k] - a[k] for a, b in zip(boots[sizes[0]], boots[s])]
            out[s][f"change:{k}"] = {"value": round(out[s][k]["value"] - out[sizes[0]][k]["value"], 4),
                                     "ci95": [round(float(np.percentile(diffs, q)), 4) for q in (2.5, 97.5)],
                                     "paired": same_docs}
    return out


# ------------------------------------------------------------------------------------------ the page
def summary(name: str) -> dict:
    import yaml

    d = DOCS / name
    params = yaml.safe_load((d / "params.yaml").read_text())
    owners = params["owners"]
    metrics = json.loads((d / "metrics.json").read_text())["bpb"]
    ceiling = json.loads((d / "routing_ceiling.json").read_text())
    avg = {m: sum(metrics[m][o] for o in owners) / len(owners) for m in ("public", "flexolmo", "flexolmo-rt", "soup", "btm")}
    avg["oracle"] = sum(metrics[f"expert:{o}"][o] for o in owners) / len(owners)
    gain = avg["public"] - avg["oracle"]
    return {
        "parameters": json.loads((d / "flexo.json").read_text())["parameters"],
        "model": params["model"], "curate": params["curate"], "epochs": params["train_public"]["epochs"],
        "avg": avg, "gain": gain, "share": {m: (v - avg["oracle"]) / gain for m, v in avg.items()},
        "domains": {m: metrics[m] for m in ("public", "flexolmo", "flexolmo-rt", "btm")},
        # "layer 1,2,3 only" at 4 layers is "layer 1,2,3,4 only" at 5: one row, "every layer but 0"
        "ceiling": {re.sub(r"in layer 1(,\d+)+ only", "in every layer but 0", r["what"]): r["bpb"]["avg"]
                    for r in ceiling["rows"]},
        "separability": {int(k): sum(v["test"]) / len(v["test"]) for k, v in ceiling["separability"].items()},
        "wall": json.loads((d / "wall.json").read_text()) if (d / "wall.json").is_file() else None,
    }


def render() -> None:
    names = [n for n in ("demo", "scale4x") if (DOCS / n / "routing_ceiling.json").is_file()]
    if not names:
        raise SystemExit("scale: error: nothing to render: run `experiments/scale.py demo` and `run` first")
    path = DOCS / "intervals.json"
    if not path.is_file() or set(json.loads(path.read_text())) != set(names):
        projects = {"demo": ROOT, "scale4x": ROOT / ".cache" / "scale" / "scale4x"}
        figures = {n: document_figures(projects[n]) for n in names}
        path.write_text(json.dumps(intervals(figures), indent=2) + "\n")
    iv = json.loads(path.read_text())
    S = {n: summary(n) for n in names}
    page = (ROOT / "docs" / "scale.md").read_text()
    keep = page.split("\n## Result", 1)[0].rstrip() + "\n"
    reading = "\n## Reading" + page.split("\n## Reading", 1)[1] if "\n## Reading" in page else ""  # written by hand
    col = " | ".join(names)
    lines = ["", f"## Result (rendered {datetime.now(timezone.utc).date()}, `experiments/scale.py render`)", "",
             f"| | {col} |", "|---|" + "---:|" * len(names),
             "| public model parameters | " + " | ".join(f"{S[n]['parameters'] / 1e6:.1f} M" for n in names) + " |",
             "| width × layers | " + " | ".join(f"{S[n]['model']['hidden_size']} × {S[n]['model']['num_layers']}" for n in names) + " |",
             "| pipeline wall time | " + " | ".join(f"{S[n]['wall']['pipeline_s'] / 60:.0f} min" if S[n]["wall"] else "(make demo)" for n in names) + " |"]
    for m in ("public", "soup", "flexolmo", "flexolmo-rt", "btm", "oracle"):
        lines.append(f"| avg owner bpb: {m} | " + " | ".join(f"{S[n]['avg'][m]:.3f}" for n in names) + " |")
    lines.append("| public → oracle gain (bpb) | " + " | ".join(f"{S[n]['gain']:.3f}" for n in names) + " |")
    for m in ("flexolmo", "flexolmo-rt", "btm"):
        lines.append(f"| share of the gain {m} leaves | " + " | ".join(f"{100 * S[n]['share'][m]:.1f}%" for n in names) + " |")
    layers = sorted(set().union(*(S[n]["separability"] for n in names)))
    for layer in layers:
        lines.append(f"| separability, layer {layer} (mean held-out recall) | "
                     + " | ".join(f"{S[n]['separability'][layer]:.3f}" if layer in S[n]["separability"] else "" for n in names) + " |")
    rows = [w for w in S[names[0]]["ceiling"] if "oracle routing" in w or "†" in w]
    for w in rows:
        lines.append(f"| ceiling: {w} | " + " | ".join(f"{S[n]['ceiling'].get(w, float('nan')):.3f}" for n in names) + " |")
    lines += ["", "Intervals: the shares recomputed from each held-out document's NLL (disjoint windows of "
              "evaluate.max_length tokens, experiments/dp_experts.py `document_nats`), 95% bootstrap over documents "
              f"resampled within each owner ({RESAMPLES} resamples); the change is the preset's share minus the demo's, "
              "paired over the same resampled documents when both sizes hold the same held-out documents.", "",
              "| size | documents | share left: flexolmo | share left: flexolmo-rt |", "|---|---|---|---|"]
    for n in names:
        docs = sum(iv[n]["documents"].values())
        cells = [f"{100 * iv[n][k]['value']:.1f}% [{100 * iv[n][k]['ci95'][0]:.1f}, {100 * iv[n][k]['ci95'][1]:.1f}]"
                 for k in ("share:flexolmo", "share:flexolmo-rt")]
        lines.append(f"| {n} | {docs} | " + " | ".join(cells) + " |")
        if "change:share:flexolmo" in iv[n]:
            cells = [f"{100 * iv[n][f'change:{k}']['value']:+.1f} pts [{100 * iv[n][f'change:{k}']['ci95'][0]:+.1f}, "
                     f"{100 * iv[n][f'change:{k}']['ci95'][1]:+.1f}]" for k in ("share:flexolmo", "share:flexolmo-rt")]
            lines.append(f"| change {names[0]} → {n} ({'paired' if iv[n]['change:share:flexolmo']['paired'] else 'independent'}) | | "
                         + " | ".join(cells) + " |")
    (ROOT / "docs" / "scale.md").write_text(keep + "\n".join(lines) + "\n" + reading)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a preset in its scratch project")
    r.add_argument("config", type=Path)
    sub.add_parser("demo", help="the demo's routing ceiling (after `make demo`) into docs/scale/demo/")
    sub.add_parser("render", help="write docs/scale.md (intervals computed once, from the models)")
    args = ap.parse_args()
    if args.cmd == "run":
        if not args.config.is_file():
            raise SystemExit(f"scale: error: preset {args.config} not found: pass a params file such as configs/scale4x.yaml")
        run(args.config.resolve())
    elif args.cmd == "demo":
        demo()
    else:
        render()


if __name__ == "__main__":
    main()
