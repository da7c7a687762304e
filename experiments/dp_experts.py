"""What DP-SGD costs the demo's experts: ε ∈ {∞, 8, 2} (issue #22).

    make dp-experts                                   # ≈ 40 min on 2 cores, after `make demo`
    .venv/bin/python experiments/dp_experts.py --epsilons 8 --owners news

ε = ∞ is the demo as built (its experts and its plain merge, models/merged: nothing is retrained). Every
finite ε trains all four owners' experts with `train_expert.dp.epsilon` = ε (the params.yaml DP settings
otherwise) in its own project under `.cache/dp-experts/eps-<ε>/`, which links the demo's curated data,
held-out splits, tokenizer, public model and router embeddings, then merges them (plain merge, top-2:
the router-tuned model would add the router statistics, a second release with its own ε). For each
setting and owner, the real stage code measures:

- own-domain bits per byte: the owner's 2-expert model on its held-out test split (lm-eval, as the table);
- the merged model's bits per byte on every owner's held-out split, and their average;
- the extraction rate and the loss-based membership-inference AUC (with its 95% bootstrap interval) of
  the owner's model on its training documents, by `flexo audit-extraction`'s functions.

Writes docs/dp_experts.json and docs/dp_experts.md (date, command, versions).
"""

from __future__ import annotations

import argparse
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
from flexo.layout import Layout  # noqa: E402
from flexo.params import as_dict, load_params, params_from_dict  # noqa: E402

LINKED = ("data/curated", "data/heldout", "models/public", "models/tokenizer", "models/router")


def scratch_project(epsilon: float, owners: list[str]):
    root = ROOT / ".cache" / "dp-experts" / f"eps-{epsilon:g}"
    for sub in ("data", "models", ".cache"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for rel in LINKED:
        link = root / rel
        if not link.exists():
            link.symlink_to(ROOT / rel, target_is_directory=True)
    raw = as_dict(load_params(ROOT / "params.yaml"))
    raw["train_expert"]["dp"]["epsilon"] = epsilon
    raw["owners"] = list(owners)
    params = params_from_dict(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return params, Layout.at(root)


def bpb(layout: Layout, params, model_dir: Path, domains: list[str]) -> dict[str, float]:
    tasks = write_domain_tasks(layout, domains, layout.root / ".cache" / "tasks", cache_dir=ROOT / ".cache" / "hf-datasets")
    scores = evaluate_model(model_dir, load_tokenizer_for(ROOT / "models" / "public", ROOT / "models" / "tokenizer"),
                            tasks, limit=None, batch_size=params.evaluate.batch_size,
                            max_length=params.evaluate.max_length, domains=domains)
    return {d: round(v, 4) for d, v in scores.items()}


def audit(owner: str, params, layout: Layout, model_dir: Path) -> dict:
    from stages.audit import audit_extraction

    report = audit_extraction(owner, params, layout, models={"expert": model_dir},
                              out=layout.root / ".cache" / f"audit-{owner}.json")
    m, e = report["membership"]["expert"], report["models"]["expert"]
    return {"extracted": e["extracted"], "documents": e["documents"], "extraction_rate": e["rate"],
            "membership_auc": m["auc"], "membership_auc_ci95": m["auc_ci95"]}


def run_setting(epsilon: float | None, owners: list[str]) -> dict:
    from stages.merge import merge
    from stages.train_expert import train_expert

    started = time.time()
    if epsilon is None:  # ε = ∞: the demo as built
        params, layout = load_params(ROOT / "params.yaml"), Layout.at(ROOT)
        merged, dp = layout.merged, {}
    else:
        params, layout = scratch_project(epsilon, owners)
        dp = {}
        for owner in owners:
            done = layout.expert(owner) / "expert.json"
            meta = json.loads(done.read_text()) if done.is_file() else {}
            if (meta.get("dp") or {}).get("target_epsilon") != epsilon:  # an earlier run's expert is kept
                meta = train_expert(owner, params, layout, resume=True)
            dp[owner] = meta["dp"]
        merge(params, layout)
        merged = layout.merged
    rows = {}
    merged_bpb = bpb(layout, params, merged, owners)
    for owner in owners:
        own = bpb(layout, params, layout.expert(owner) / "model", [owner])[owner]
        rows[owner] = {"own_bpb": own, "merged_bpb": merged_bpb[owner], **audit(owner, params, layout,
                                                                                   layout.expert(owner) / "model"),
                       **({"dp": dp[owner]} if owner in dp else {})}
        print(f"ε={'∞' if epsilon is None else epsilon:>4}: {owner}: {rows[owner]}", flush=True)
    return {"epsilon": epsilon, "owners": rows, "merged_avg_owner_bpb": round(sum(merged_bpb.values()) / len(owners), 4),
            "wall_s": round(time.time() - started, 1)}


def public_reference(owners: list[str]) -> dict:
    """The demo's public model on each owner's split (results/scores, results/extraction): the bpb an expert
    starts from, and the membership AUC of a model that never saw the split (the split's own baseline)."""
    ref = {}
    for o in owners:
        scores = json.loads((ROOT / "results" / "scores" / f"{o}.json").read_text())
        audit = json.loads((ROOT / "results" / "extraction" / f"{o}.json").read_text())
        ref[o] = {"bpb": round(scores["bpb"]["public"], 4), "membership_auc": audit["membership"]["public"]["auc"],
                  "members": audit["membership"]["public"]["members"]}
    return ref


@torch.no_grad()
def document_nats(model, tokenizer, texts: list[str], window: int) -> list[float]:
    """Each document's total NLL (nats): disjoint windows of `window` tokens, the first after an EOS, each
    later one after the tokens of the window before it (a close stand-in for lm-eval's rolling windows)."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        seq, total = [eos, *ids], 0.0
        for start in range(1, len(seq), window):
            ctx = max(0, start - window)
            x = torch.tensor([seq[ctx:start + window]])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
            tgt = x[0, 1:]
            nll = -logp.gather(1, tgt[:, None])[:, 0]
            total += float(nll[start - ctx - 1:].sum())
        out.append(total)
    return out


def paired_interval(a: list[float], b: list[float], nbytes: list[int], *, resamples: int = 2000, seed: int = 0):
    """bpb(a) − bpb(b) over the same documents and its 95% paired bootstrap interval (documents resampled)."""
    import numpy as np

    a, b, n = np.array(a), np.array(b), np.array(nbytes, dtype=float)
    rng = np.random.default_rng(seed)
    diff = lambda i: (a[i].sum() - b[i].sum()) / n[i].sum() / np.log(2)  # noqa: E731
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    boots = np.array([diff(i) for i in idx])
    return float(diff(np.arange(len(a)))), [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def intervals(report: dict) -> dict:
    """Own-domain bpb differences with paired bootstrap intervals: each DP expert vs the ε = ∞ expert and vs
    the public model, on each owner's held-out documents."""
    from flexo.data import read_split
    from flexo.modeling import load_model
    from flexo.tokenization import load_tokenizer

    layout = Layout.at(ROOT)
    tok = load_tokenizer(layout)
    window = load_params(ROOT / "params.yaml").evaluate.max_length
    out = {}
    for owner in report["settings"][0]["owners"]:
        texts = read_split(layout, owner, "test")
        nbytes = [len(t.encode()) for t in texts]
        models = {"public": layout.public_model, "inf": layout.expert(owner) / "model"}
        for s in report["settings"]:
            if s["epsilon"] is not None:
                models[f"{s['epsilon']:g}"] = ROOT / ".cache" / "dp-experts" / f"eps-{s['epsilon']:g}" / "models" / \
                    "experts" / owner / "model"
        nats = {k: document_nats(load_model(p).eval(), tok, texts, window) for k, p in models.items()}
        out[owner] = {"documents": len(texts)}
        for k in models:
            if k not in ("public", "inf"):
                for ref in ("inf", "public"):
                    d, ci = paired_interval(nats[k], nats[ref], nbytes)
                    out[owner][f"eps{k}-minus-{ref}"] = {"diff": round(d, 4), "ci95": [round(ci[0], 4), round(ci[1], 4)]}
        print(owner, out[owner], flush=True)
    return out


def write_report(report: dict) -> None:
    out = ROOT / "docs"
    (out / "dp_experts.json").write_text(json.dumps(report, indent=2) + "\n")
    owners = list(report["settings"][0]["owners"])
    ref = report["public"]
    lines = [f"# DP-SGD experts: what ε costs — {report['date']}", "",
             f"Command: `{report['command']}`. Python {report['versions']['python']}, torch "
             f"{report['versions']['torch']}, opacus {report['versions']['opacus']}, {report['versions']['cpus']} CPUs.",
             "", "ε = ∞ is the demo as built (default recipe, no DP). Each finite ε: all four owners retrained with "
             "`train_expert.dp` (one document = the privacy unit, Poisson sampling, per-document clipping, Gaussian "
             "noise from Opacus's RDP accountant; router row trained inside DP-SGD from r_pub; public_mix text outside "
             "the private batches), then a plain merge (top-2). Bits per byte on each owner's held-out test split "
             "(lm-eval); extraction and membership AUC on the owner's own 2-expert model (`flexo audit-extraction`'s "
             "code: 32 training documents, 32-token prefix, 32 tokens sampled; AUC of the loss over as many train as "
             "held-out documents — " + ", ".join(f"{o} {ref[o]['members']}" for o in owners) + " each, the held-out "
             "splits being small — with its 95% bootstrap interval). The public row is the demo's public model: the "
             "bits per byte every expert starts from, and the AUC of a model that never saw the split (the split's "
             "own baseline: creative's held-out poems are easier than its training ones).", "",
             "| ε | " + " | ".join(f"{o}: own bpb" for o in owners) + " | merged avg owner bpb | "
             + " | ".join(f"{o}: extracted" for o in owners) + " | " + " | ".join(f"{o}: MIA AUC [95% CI]" for o in owners)
             + " |", "|" + "---|" * (2 + 3 * len(owners))]
    lines.append("| public (reference) | " + " | ".join(f"{ref[o]['bpb']:.3f}" for o in owners) + " | "
                 + f"{sum(ref[o]['bpb'] for o in owners) / len(owners):.3f} | " + " | ".join("" for _ in owners) + " | "
                 + " | ".join(f"{ref[o]['membership_auc']:.3f}" for o in owners) + " |")
    for s in report["settings"]:
        eps = "∞" if s["epsilon"] is None else f"{s['epsilon']:g}"
        r = s["owners"]
        lines.append(f"| {eps} | " + " | ".join(f"{r[o]['own_bpb']:.3f}" for o in owners)
                     + f" | {s['merged_avg_owner_bpb']:.3f} | "
                     + " | ".join(f"{r[o]['extracted']}/{r[o]['documents']}" for o in owners) + " | "
                     + " | ".join(f"{r[o]['membership_auc']:.3f} [{r[o]['membership_auc_ci95'][0]:.2f}, "
                                  f"{r[o]['membership_auc_ci95'][1]:.2f}]" for o in owners) + " |")
    full = next((s for s in report["settings"] if s["epsilon"] is None), None)
    if full:
        lines += ["", "Share of the expert's gain over the public model kept under DP, (public − DP) / (public − ε = ∞), "
                  "own-domain bits per byte:", "", "| ε | " + " | ".join(owners) + " |", "|---|" + "---:|" * len(owners)]
        for s in report["settings"]:
            if s["epsilon"] is not None:
                lines.append(f"| {s['epsilon']:g} | " + " | ".join(
                    f"{(ref[o]['bpb'] - s['owners'][o]['own_bpb']) / (ref[o]['bpb'] - full['owners'][o]['own_bpb']):.1%}"
                    for o in owners) + " |")
    if report.get("intervals"):
        lines += ["", "Paired differences in own-domain bits per byte (DP expert − reference, same held-out documents; "
                  "per-document NLL from windows of 256 tokens; 95% paired bootstrap interval over documents, 2000 "
                  "resamples). Positive = the DP expert is worse.", "",
                  "| owner (documents) | comparison | difference | 95% interval | verdict |", "|---|---|---:|---|---|"]
        for o in owners:
            iv = report["intervals"][o]
            for key, v in iv.items():
                if key == "documents":
                    continue
                eps, ref = key.removeprefix("eps").split("-minus-")
                verdict = "no difference shown" if v["ci95"][0] <= 0 <= v["ci95"][1] else (
                    "DP worse" if v["diff"] > 0 else "DP better")
                lines.append(f"| {o} ({iv['documents']}) | ε={eps} − {'ε=∞' if ref == 'inf' else 'public'} | "
                             f"{v['diff']:+.3f} | [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] | {verdict} |")
    dp_rows = [(s["epsilon"], o, s["owners"][o]["dp"]) for s in report["settings"] for o in owners
               if "dp" in s["owners"][o]]
    if dp_rows:
        lines += ["", "The guarantees as spent (expert.json `dp`):", "",
                  "| target ε | owner | ε spent | δ | noise multiplier | steps | documents | sampling rate |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {e:g} | {o} | {d['epsilon']:.3f} | {d['delta']:g} | {d['noise_multiplier']:.3f} | {d['steps']} | "
                  f"{d['documents']} | {d['sample_rate']:.4f} |" for e, o, d in dp_rows]
    (out / "dp_experts.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", default="inf,8,2", help="comma-separated; inf = the demo as built")
    ap.add_argument("--owners", default=None, help="comma-separated (default: params.yaml owners)")
    ap.add_argument("--render", action="store_true", help="only rewrite docs/dp_experts.md from docs/dp_experts.json")
    ap.add_argument("--intervals", action="store_true", help="with --render: recompute the paired intervals")
    args = ap.parse_args()
    if args.render:
        report = json.loads((ROOT / "docs" / "dp_experts.json").read_text())
        report.setdefault("public", public_reference(list(report["settings"][0]["owners"])))
        if args.intervals or "intervals" not in report:
            report["intervals"] = intervals(report)
        write_report(report)
        print((ROOT / "docs" / "dp_experts.md").read_text())
        return
    import opacus

    params = load_params(ROOT / "params.yaml")
    owners = args.owners.split(",") if args.owners else list(params.owners)
    if not (ROOT / "models" / "merged" / "config.json").is_file():
        raise SystemExit("experiments/dp_experts.py: models/merged is missing: run `make demo` first")
    torch.set_num_threads(os.cpu_count() or 1)
    settings = [run_setting(None if e == "inf" else float(e), owners) for e in args.epsilons.split(",")]
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "command": "make dp-experts" if args.epsilons == "inf,8,2" and not args.owners
              else "python experiments/dp_experts.py " + " ".join(sys.argv[1:]),
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__,
                           "cpus": os.cpu_count()},
              "settings": settings, "public": public_reference(owners)}
    report["intervals"] = intervals(report)
    write_report(report)
    print((ROOT / "docs" / "dp_experts.md").read_text())


if __name__ == "__main__":
    main()
