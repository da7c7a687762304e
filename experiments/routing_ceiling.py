"""Where the merged model loses to BTM, and how far any bias-free linear router could go (issue #9).

    .venv/bin/python experiments/routing_ceiling.py        # ≈ 10 min on 2 cores, after `make demo`

Reads the demo's models (models/merged, models/merged-rt, the experts, the public model) and data.
Some measurements below read several owners' text in one process: they are diagnostics that the
pipeline must not and does not do, run here only to bound what a router could reach.

1. Oracle routing: each owner's domain scored with every other owner's expert masked (all layers), with
   the plain rows and with the federated fit's rows: what routing alone costs.
2. Oracle routing in some layers only (fitted rows elsewhere): which layer's routing holds the gap.
3. The fit on the owners' real router inputs instead of Gaussian samples of their statistics: whether
   the summaries lose anything.
4. Router rows tuned on the LM loss over every owner's text jointly, from the fitted rows: a ceiling
   for any linear router of this model at this budget.
5. How separable the domains are, token by token, at each layer's router input of the public model:
   the recall of a linear classifier on held-out text.

Writes results/routing_ceiling.{json,md}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from flexo.evaluation import evaluate_model, load_tokenizer_for, write_domain_tasks  # noqa: E402
from flexo.fsutil import atomic_file, write_json  # noqa: E402
from flexo.layout import Layout  # noqa: E402
from flexo.modeling import load_model, read_meta  # noqa: E402
from flexo.params import PUBLIC, load_params  # noqa: E402
from flexo.router_fit import class_recall, gates, multinomial_rows, router_inputs  # noqa: E402
from flexo.routers import runtime_opt_out  # noqa: E402
from flexo.training import pack, set_threads  # noqa: E402
from flexo.data import read_split  # noqa: E402

JOINT_STEPS = 200   # Adam steps of the joint LM-loss router tuning (2 blocks of each owner per step)
JOINT_LR = 3e-3


class Bench:
    def __init__(self):
        set_threads()
        self.layout = Layout.at(ROOT)
        self.params = load_params(self.layout.params)
        self.owners = list(self.params.owners)
        self.domains = [PUBLIC, *self.owners]
        self.tok = load_tokenizer_for(self.layout.public_model, self.layout.tokenizer)
        self.tasks = write_domain_tasks(self.layout, self.domains, ROOT / ".cache" / "bench" / "ceiling-tasks")
        self.rows: list[dict] = []

    def score(self, model, domains: list[str]) -> dict[str, float]:
        ev = self.params.evaluate
        s = evaluate_model(model, self.tok, self.tasks, limit=None, batch_size=ev.batch_size,
                           max_length=ev.max_length, domains=domains)
        return {d: round(v, 4) for d, v in s.items()}

    def add(self, what: str, bpb: dict[str, float], **extra) -> None:
        bpb = dict(bpb, avg=round(sum(bpb[o] for o in self.owners) / len(self.owners), 4))
        self.rows.append({"what": what, "bpb": bpb, **extra})
        print(f"[ceiling] {what}: " + " ".join(f"{k} {v:.3f}" for k, v in bpb.items()), flush=True)

    def blocks(self, domain: str, split: str) -> torch.Tensor:
        if split == "test":
            texts = [json.loads(line)["text"] for line in open(self.layout.heldout(domain) / "test.jsonl")]
        else:
            texts = read_split(self.layout, domain, split)
        return pack(self.tok, texts, self.params.model.max_seq_len, f"{domain} {split}")

    # ---------------------------------------------------------------------------------------- 1, 2
    def oracle(self, name: str, folder: Path, layers: list[int] | None) -> None:
        """Each owner domain with the other owners' experts masked in `layers` (None = all)."""
        model = load_model(folder)
        experts = read_meta(folder)["experts"]
        out = {}
        for o in self.owners:
            with runtime_opt_out(model, experts, [e for e in self.owners if e != o], layers=layers):
                out.update(self.score(model, [o]))
        where = "every layer" if layers is None else "layer " + ",".join(map(str, layers)) + " only"
        self.add(f"{name}, oracle routing in {where}", out)

    # ------------------------------------------------------------------------------------------ 3
    def real_feature_fit(self) -> None:
        rt = self.params.router_tune
        feats = [router_inputs(load_model(self.layout.public_model), self.blocks(PUBLIC, "train"),
                               max_blocks=rt.stats_documents)]
        for o in self.owners:
            feats.append(router_inputs(load_model(self.layout.expert(o) / "model"), self.blocks(o, "train"),
                                       max_blocks=rt.stats_documents))
        model = load_model(self.layout.merged_rt)
        fits = [multinomial_rows([f[i] for f in feats], l2=rt.fit_l2, steps=rt.fit_steps, lr=rt.fit_lr)
                for i in range(len(feats[0]))]
        with torch.no_grad():
            for gate, (w, _) in zip(gates(model), fits):
                gate.weight[1:] = gate.weight[0] + w
        self.add("† fit on the owners' real router inputs (instead of Gaussian samples of their statistics)",
                 self.score(model, self.domains), train_recall_per_layer=[fig["sample_recall"] for _, fig in fits])

    # ------------------------------------------------------------------------------------------ 4
    def joint_lm_tuning(self) -> None:
        model = load_model(self.layout.merged_rt)
        for p in model.parameters():
            p.requires_grad_(False)
        weights = [g.weight for g in gates(model)]
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam(weights, lr=JOINT_LR)
        data = {o: self.blocks(o, "train") for o in self.owners}
        g = torch.Generator().manual_seed(0)
        t0 = time.time()
        for _ in range(JOINT_STEPS):
            batch = torch.cat([data[o][torch.randint(len(data[o]), (2,), generator=g)] for o in self.owners])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            for w in weights:
                w.grad[0] = 0  # r_pub stays the public model's row
            opt.step()
        model.eval()
        with torch.no_grad():
            self.add(f"† rows tuned on the LM loss over all owners' text jointly ({JOINT_STEPS} steps)",
                     self.score(model, self.domains), tune_s=round(time.time() - t0, 1))

    # ------------------------------------------------------------------------------------------ 5
    def separability(self) -> dict:
        model = load_model(self.layout.public_model)
        blocks = self.params.router_tune.stats_documents
        train = [router_inputs(model, self.blocks(d, "train"), max_blocks=blocks) for d in self.domains]
        test = [router_inputs(model, self.blocks(d, "test"), max_blocks=blocks) for d in self.domains]
        rt = self.params.router_tune
        out = {}
        for i in range(len(train[0])):
            w, fig = multinomial_rows([f[i] for f in train], l2=rt.fit_l2, steps=rt.fit_steps, lr=rt.fit_lr)
            out[i] = {"train": fig["sample_recall"], "test": class_recall(w, [f[i] for f in test])}
            print(f"[ceiling] public model, layer {i}: held-out recall {out[i]['test']}", flush=True)
        return out


def render(report: dict, domains: list[str]) -> str:
    lines = [f"# Routing ceiling ({report['started']}, {report['machine']})", "",
             "Bits per byte on each domain's held-out test split (lm-eval, the main table's suite); avg = mean "
             "over the owner domains. Rows marked † read several owners' text in one process: diagnostics "
             "only (experiments/routing_ceiling.py), never part of the pipeline.", "",
             "| measurement | " + " | ".join(domains) + " | avg |", "|---|" + "---:|" * (len(domains) + 1)]
    for r in report["rows"]:
        cells = [f"{r['bpb'][d]:.3f}" if d in r["bpb"] else "" for d in domains]
        lines.append(f"| {r['what']} | " + " | ".join(cells) + f" | {r['bpb']['avg']:.3f} |")
    lines += ["", "Linear separability of the domains at each layer's router input of the public model "
              "(multinomial logistic regression, recall per class on held-out text; classes: "
              + ", ".join(domains) + "):", "", "| layer | train recall | held-out recall |", "|---|---|---|"]
    for layer, v in report["separability"].items():
        lines.append(f"| {layer} | {v['train']} | {v['test']} |")
    return "\n".join(lines) + "\n"


def require_demo(layout: Layout, owners: list[str]) -> None:
    """One line and exit 2 unless the demo's models and results are here (nothing is written before)."""
    need = [layout.public_model / "config.json", layout.merged / "config.json", layout.merged_rt / "flexo.json",
            layout.results / "metrics.json", *(layout.expert(o) / "model" / "config.json" for o in owners)]
    missing = [str(p.relative_to(layout.root)) for p in need if not p.is_file()]
    if missing:
        raise SystemExit(f"routing_ceiling: error: {missing[0]} is missing ({len(missing)} demo outputs in all): "
                         "run `make demo` first")
    if read_meta(layout.merged_rt).get("router_tune", {}).get("method") != "federated":
        raise SystemExit("routing_ceiling: error: models/merged-rt is not the federated router fit: set "
                         "router_tune.method: federated in params.yaml and run `make demo`")


def main() -> None:
    layout = Layout.at(ROOT)
    require_demo(layout, list(load_params(layout.params).owners))
    b = Bench()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    metrics = json.loads((b.layout.results / "metrics.json").read_text())["bpb"]
    for name in ("btm", "flexolmo", "flexolmo-rt"):
        b.add(f"{name} (results/metrics.json)", {d: round(metrics[name][d], 4) for d in b.domains})
    b.add("oracle: each domain by its owner's model",
          {o: round(metrics[f"expert:{o}"][o], 4) for o in b.owners})
    b.oracle("plain rows (flexolmo)", b.layout.merged, None)
    b.oracle("fitted rows (flexolmo-rt)", b.layout.merged_rt, None)
    b.oracle("fitted rows", b.layout.merged_rt, [0])
    b.oracle("fitted rows", b.layout.merged_rt, list(range(1, b.params.model.num_layers)))
    b.real_feature_fit()
    b.joint_lm_tuning()
    report = {"started": started, "machine": f"{os.cpu_count()} cores", "rows": b.rows,
              "separability": b.separability(),
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = b.layout.results
    write_json(out / "routing_ceiling.json", report)
    with atomic_file(out / "routing_ceiling.md") as f:
        f.write(render(report, b.domains))
    print((out / "routing_ceiling.md").read_text())


if __name__ == "__main__":
    main()
