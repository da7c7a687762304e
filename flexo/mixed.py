"""The mixed-domain suite: held-out documents that switch domain part-way.

Token-level routing is where a mixture of experts should beat document-level ensembling: in text that
changes domain (a news story quoting code, a solution inside a narrative) BTM's posterior over whole
prefixes lags behind each switch, while FlexOlmo's router decides per token. Each owner builds its mixed
documents on its own machine from its own held-out split and the public held-out split (public text):
segments of about `segment_chars` characters, cut at whitespace, alternating between the two sources,
half of the documents starting with the owner's text and half with public text. Owners' texts are
never mixed with each other, which would need one owner's text on another's machine.

The documents are deterministic (seeded by their index and the owner's name), and each records where
its segments start and which source each came from, for the per-token routing plot.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from flexo.errors import FlexoError
from flexo.fsutil import atomic_file

DOCUMENTS = 12  # mixed documents per owner
SEGMENTS = 4  # segments per document (3 switches)
SEGMENT_CHARS = 600  # characters per segment (about 150-300 tokens)


@dataclass(frozen=True)
class MixedDocument:
    text: str
    starts: tuple[int, ...]  # character offset of each segment
    sources: tuple[str, ...]  # the domain each segment came from


def _texts(path: Path) -> list[str]:
    docs = [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [d for d in docs if len(d) >= SEGMENT_CHARS // 2]


def _segment(doc: str, rng: random.Random) -> str:
    """About SEGMENT_CHARS characters of `doc` from a random offset, cut at whitespace on both ends."""
    if len(doc) <= SEGMENT_CHARS:
        return doc.strip()
    start = rng.randrange(0, len(doc) - SEGMENT_CHARS)
    piece = doc[start:start + SEGMENT_CHARS]
    head = piece.find(" ") if start else -1
    tail = piece.rfind(" ")
    return piece[head + 1:tail if tail > head + 1 else None].strip()


def mixed_documents(owner: str, own_file: Path, public_file: Path, *, documents: int = DOCUMENTS,
                    segments: int = SEGMENTS) -> list[MixedDocument]:
    """`documents` texts alternating `owner`'s held-out text with public held-out text."""
    own, public = _texts(own_file), _texts(public_file)
    if not own or not public:
        empty = own_file if not own else public_file
        raise FlexoError(f"{empty} has no document of at least {SEGMENT_CHARS // 2} characters to build the mixed "
                         "suite from: curate more held-out text (curate.max_eval_chars)")
    seed = int.from_bytes(hashlib.sha256(owner.encode()).digest()[:4], "big")
    out = []
    for i in range(documents):
        rng = random.Random(seed * 1000 + i)
        order = [owner, "public"] if i % 2 == 0 else ["public", owner]
        text, starts, sources = "", [], []
        for s in range(segments):
            source = order[s % 2]
            piece = _segment(rng.choice(own if source == owner else public), rng)
            if text:
                text += "\n\n"
            starts.append(len(text))
            sources.append(source)
            text += piece
        out.append(MixedDocument(text, tuple(starts), tuple(sources)))
    return out


def write_mixed(path: Path, docs: list[MixedDocument]) -> Path:
    """The documents as a jsonl of {"text": …} (what lm-eval's task reads), written atomically."""
    with atomic_file(path) as f:
        for d in docs:
            f.write(json.dumps({"text": d.text}, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------ scoring
MIXED_ROWS = ("public", "flexolmo", "flexolmo-rt", "soup", "btm", "btm-top2", "prompt-routing")  # the suite's rows (no opt-outs)
DOMAIN = "mixed"
TRACE_BIN = 8  # tokens per point of the shipped routing trace (a coarse curve, not per-token values)


def score_mixed(owner: str, params, layout, tokenizer, *, limit: int | None) -> dict | None:
    """The owner's mixed documents scored by the suite's rows: {"documents", "bpb", "bootstrap", "trace"}, or
    None when the public held-out split is not here (the suite needs it)."""
    from flexo.evaluation import write_domain_tasks
    from flexo.params import PUBLIC
    from flexo.scoring import score_models

    public_test = layout.split_file(PUBLIC, "test")
    if not public_test.is_file():
        return None
    docs = mixed_documents(owner, layout.split_file(owner, "test"), public_test)
    work = layout.root / ".cache" / "score" / owner  # stays on the owner's machine, like its held-out text
    path = write_mixed(work / "mixed.jsonl", docs)
    replicates: dict = {}
    bpb, _ = score_models(params, layout, [DOMAIN], limit=limit, tokenizer=tokenizer, replicates=replicates,
                          write_tasks=lambda: write_domain_tasks(layout, [DOMAIN], work / "mixed_tasks",
                                                                 files={DOMAIN: path}),
                          only=MIXED_ROWS)
    return {"documents": min(len(docs), limit or len(docs)), "segments": SEGMENTS, "segment_chars": SEGMENT_CHARS,
            "bpb": {m: s[DOMAIN] for m, s in bpb.items()},
            "bootstrap": {m: r[DOMAIN] for m, r in replicates.items()},
            "trace": routing_trace(params, layout, tokenizer, docs[0], list(bpb))}


def _bins(values, n: int) -> list:
    """Means of consecutive `n`-token bins of a [T, E] tensor, as rounded lists."""
    import torch

    t = values.shape[0] // n * n
    binned = values[:t].reshape(-1, n, values.shape[1]).mean(dim=1) if t else values.mean(dim=0, keepdim=True)
    return [[round(float(v), 3) for v in row] for row in binned.to(torch.float64)]


def routing_trace(params, layout, tokenizer, doc: MixedDocument, rows: list[str]) -> dict:
    """Along one mixed document, in bins of TRACE_BIN tokens: each merged model's mean router probability per
    expert (over layers) and BTM's posterior weight per member, with the bins where the segments start."""
    import torch
    from lm_eval.api.instance import Instance

    from flexo.attribution import routing_capture
    from flexo.baselines import BTMLM
    from flexo.modeling import load_model, read_meta
    from flexo.params import PUBLIC
    from flexo.scoring import load_owner_model, owner_model_path

    ids = tokenizer.encode(doc.text, add_special_tokens=False)
    starts = [len(tokenizer.encode(doc.text[:s], add_special_tokens=False)) // TRACE_BIN for s in doc.starts]
    trace = {"bin_tokens": TRACE_BIN, "tokens": len(ids), "segment_bins": starts, "sources": list(doc.sources),
             "routers": {}}
    for name, folder in (("flexolmo", layout.merged), ("flexolmo-rt", layout.merged_rt)):
        if name in rows:
            experts = list(read_meta(folder).get("experts") or [])
            capture = routing_capture(load_model(folder), tokenizer, doc.text, experts)
            trace["routers"][name] = {"experts": experts, "probs": _bins(capture.probs.mean(dim=0), TRACE_BIN)}
    if "btm" in rows:
        members = [load_owner_model(layout.public_model, p)
                   for p in [layout.public_model, *(owner_model_path(layout, o) for o in params.owners)]]
        lm = BTMLM(members, tokenizer=tokenizer, names=[PUBLIC, *params.owners],
                   batch_size=params.evaluate.batch_size, max_length=params.evaluate.max_length)
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc.text,), 0)])
        member_lp = lm.member_tokens[doc.text]  # [M, T]: each member's log-prob of every token
        so_far = torch.cumsum(member_lp, dim=1) - member_lp
        weights = torch.softmax(so_far, dim=0).T  # [T, M]: the posterior BTM mixes by
        trace["btm"] = {"members": [PUBLIC, *params.owners], "weights": _bins(weights, TRACE_BIN)}
    return trace


# ------------------------------------------------------------------------------------- the centre's report
COMPARISONS = (("flexolmo", "btm"), ("flexolmo-rt", "btm"), ("flexolmo", "btm-top2"), ("flexolmo-rt", "btm-top2"),
               ("btm-top2", "btm"), ("flexolmo-rt", "public"), ("flexolmo", "prompt-routing"),
               ("flexolmo-rt", "prompt-routing"))


def mixed_report(shipped: dict[str, dict], out_dir: Path) -> dict | None:
    """From the owners' shipped mixed-suite scores: `out_dir/mixed.md` (the table and paired comparisons) and
    `out_dir/mixed_routing.png` (routing along one document per owner); returns the metrics, or None when no
    owner shipped the suite."""
    from flexo.intervals import paired

    owners = [o for o, rec in shipped.items() if rec.get("mixed")]
    if not owners:  # a public-only centre, or owners' older scores: say so (both files are DVC outputs)
        with atomic_file(Path(out_dir) / "mixed.md") as f:
            f.write("Mixed-domain suite: no owner's scores here hold it (each owner runs `flexo score`).\n")
        plot_traces({}, Path(out_dir) / "mixed_routing.png")
        return None
    rows = [m for m in shipped[owners[0]]["mixed"]["bpb"] if all(m in shipped[o]["mixed"]["bpb"] for o in owners)]
    bpb = {m: {o: shipped[o]["mixed"]["bpb"][m] for o in owners} for m in rows}
    reps = {m: {o: shipped[o]["mixed"]["bootstrap"][m] for o in owners} for m in rows}
    avg = {m: round(sum(v.values()) / len(owners), 6) for m, v in bpb.items()}
    comps = {f"{a} - {b}": paired((a, b), bpb[a], bpb[b], reps[a], reps[b], owners)
             for a, b in COMPARISONS if a in bpb and b in bpb}
    first = shipped[owners[0]]["mixed"]
    best = min(avg.values())
    lines = [f"Mixed-domain suite: each owner's held-out text alternating with public held-out text "
             f"({first['documents']} documents per owner, {first['segments']} segments of about "
             f"{first['segment_chars']} characters, 3 switches, half starting with each source); bits per byte, lower "
             "is better; btm-top2 = BTM mixing only the 2 members with the highest posterior after 32 tokens.", "",
             "| model | " + " | ".join(f"mixed:{o}" for o in owners) + " | avg |", "|---|" + "---:|" * (len(owners) + 1)]
    for m in rows:
        a = f"**{avg[m]:.3f}**" if avg[m] == best else f"{avg[m]:.3f}"
        lines.append(f"| {m} | " + " | ".join(f"{bpb[m][o]:.3f}" for o in owners) + f" | {a} |")
    lines += ["", "Paired comparisons (a − b of the average, negative = a better; 95% paired bootstrap interval over "
              "each owner's mixed documents):", "", "| a − b | difference | relative | 95% interval | reading |",
              "|---|---:|---:|---|---|"]
    for pair, c in comps.items():
        lines.append(f"| {pair} | {c['diff']:+.4f} | {100 * c['relative']:+.2f}% | [{c['ci95'][0]:+.4f}, "
                     f"{c['ci95'][1]:+.4f}] | {c['shown']} |")
    with atomic_file(Path(out_dir) / "mixed.md") as f:
        f.write("\n".join(lines) + "\n")
    plot_traces({o: shipped[o]["mixed"]["trace"] for o in owners}, Path(out_dir) / "mixed_routing.png")
    return {"bpb": bpb, "avg": avg, "comparisons": comps, "owners": owners}


def plot_traces(traces: dict[str, dict], path: Path) -> None:
    """Per owner, along one mixed document: the router-tuned model's mean router probability of each expert
    (top) and BTM's posterior weights (bottom), with the segment starts marked and labelled by source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flexo.fsutil import atomic_path

    if not traces:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no mixed-domain scores shipped", ha="center", va="center")
    else:
        fig, axes = plt.subplots(2, len(traces), figsize=(4.2 * len(traces), 5.2), squeeze=False, sharey=True)
        for col, (owner, tr) in enumerate(traces.items()):
            router = tr["routers"].get("flexolmo-rt") or tr["routers"].get("flexolmo")
            name = "flexolmo-rt" if "flexolmo-rt" in tr["routers"] else "flexolmo"
            panels = [(f"{name} router", router["experts"] if router else [], router["probs"] if router else []),
                      ("BTM posterior", tr.get("btm", {}).get("members", []), tr.get("btm", {}).get("weights", []))]
            for row, (title, labels, values) in enumerate(panels):
                ax = axes[row][col]
                if values:
                    xs = [i * tr["bin_tokens"] for i in range(len(values))]
                    ax.stackplot(xs, list(zip(*values)), labels=labels, alpha=0.85)
                for b, src in zip(tr["segment_bins"], tr["sources"]):
                    ax.axvline(b * tr["bin_tokens"], color="k", lw=0.8, ls="--")
                    ax.text(b * tr["bin_tokens"] + 2, 1.02, src, fontsize=7, va="bottom")
                ax.set_ylim(0, 1)
                ax.set_title(f"{owner}: {title}", fontsize=9, pad=14)
                if col == 0:
                    ax.set_ylabel("share")
                if row == 1:
                    ax.set_xlabel("token")
            axes[0][col].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
