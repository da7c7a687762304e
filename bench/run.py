"""`make bench`: flexo's speed and memory, each figure a ratio against the plain way of doing the same
step, measured side by side in one run. Writes results/bench.json and results/bench-<date>.md.

    .venv/bin/python bench/run.py [--before REV] [--skip-merge]

Figures (goal in brackets; merge and cp are each timed until `sync` returns, merges best of two):
- dp_vs_train           tokens/s of train-expert's DP-SGD loop (flexo/dp.py) over its ordinary loop, same owner
- train_vs_plain_loop   tokens/s of train-expert's loop (flexo.training.train: masks, clipping, periodic
                        validation and checkpoints) over a minimal hand-written AdamW loop, same model,
                        batches and steps [≥ 0.9]
- merge_vs_copy         bytes/s of `flexo merge` over `cp -r` of the same ≥ 2 GB of synthetic packages [≥ 0.8]
- merge_peak_rss_over_largest_input   the merge's peak RSS over the largest input file [≤ 1.5]
- demo_wall_s + stages  from the last `make demo` (.cache/demo_wall.json, .cache/timings.jsonl)
- eval_tokens_per_s_merged_over_public   forward tokens/s of the merged MoE over the dense public model
With --before REV the merge is also timed with the code at git revision REV on the same inputs.
Needs the demo's artifacts (models/, data/): run `make demo` first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

STEPS = 20


# ------------------------------------------------------------------------------------ training loop
def _expert_setup(owner: str):
    """The model, trainables, masks and batches `flexo train-expert` builds, without training."""
    from flexo.layout import Layout
    from flexo.modeling import coupled_model, read_router_row
    from flexo.params import PUBLIC, load_params
    from flexo.training import Batches, pack
    from flexo.data import read_split
    from flexo.tokenization import load_tokenizer
    from stages.train_expert import load_public, owner_trainables

    layout = Layout.at(ROOT)
    params = load_params(layout.params)
    tok = load_tokenizer(layout)
    public, _ = load_public(layout, verify=False)
    model = coupled_model(public, read_router_row(layout.router_embedding(owner), params.model.hidden_size))
    trainable, masks = owner_trainables(model)
    seq = params.model.max_seq_len
    tp = params.train_expert
    own = pack(tok, read_split(layout, owner, "train"), seq, owner)
    mix = pack(tok, read_split(layout, PUBLIC, "train"), seq, "public")
    val = pack(tok, read_split(layout, owner, "val"), seq, owner)
    return params, model, trainable, masks, Batches(own, tp.batch_size, tp.seed, mix, tp.public_mix), val


def flexo_loop(owner: str) -> dict:
    from dataclasses import replace

    from flexo.training import train

    params, model, trainable, masks, batches, val = _expert_setup(owner)
    tp = replace(params.train_expert, max_steps=STEPS, backend="torch")
    ckpt = ROOT / ".cache" / "bench" / "ckpt"
    t0 = time.time()
    r = train(model, batches, val, tp, trainable=trainable, grad_masks=masks, ckpt_dir=ckpt,
              key_parts={"bench": time.time()}, resume=False, desc="bench flexo loop")
    wall = time.time() - t0
    from flexo.training import drop_checkpoint

    drop_checkpoint(ckpt)
    tokens = STEPS * batches.batch_size * batches.blocks.shape[1]
    return {"step_tokens_per_s": r.step_tokens_per_s, "loop_tokens_per_s": r.tokens_per_s,
            "call_tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 1)}


def plain_loop(owner: str) -> dict:
    """The hand-written baseline: same model, batches and optimizer settings, nothing else."""
    params, model, trainable, _, batches, _ = _expert_setup(owner)
    tp = params.train_expert
    torch.set_num_threads(os.cpu_count() or 1)
    opt = torch.optim.AdamW(list(trainable.values()), lr=tp.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(STEPS):
        x = batches.batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tp.bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall = time.time() - t0
    tokens = STEPS * batches.batch_size * batches.blocks.shape[1]
    return {"tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 1)}


def dp_loop(owner: str) -> dict:
    """train-expert's DP-SGD loop (flexo/dp.py, ε = 8) on the same owner: one backward pass per sampled
    document (its own gradient, clipped), noise, public text mixed in. Tokens: the documents' own tokens
    (padding left out) plus the public blocks."""
    from dataclasses import replace

    from flexo.data import read_split
    from flexo.dp import document_examples, train_dp
    from flexo.layout import Layout
    from flexo.tokenization import load_tokenizer
    from flexo.training import drop_checkpoint

    params, model, trainable, masks, batches, val = _expert_setup(owner)
    layout = Layout.at(ROOT)
    dp = replace(params.train_expert.dp, epsilon=8.0)
    tp = replace(params.train_expert, max_steps=STEPS, backend="torch", dp=dp)
    examples = document_examples(load_tokenizer(layout), read_split(layout, owner, "train"),
                                 params.model.max_seq_len, dp.blocks_per_document)
    ckpt = ROOT / ".cache" / "bench" / "ckpt-dp"
    t0 = time.time()
    r, _ = train_dp(model, examples, batches.mix, val, tp, dp, trainable=trainable, grad_masks=masks, ckpt_dir=ckpt,
                    key_parts={"bench": time.time()}, secret=b"bench", resume=False, desc="bench DP loop")
    drop_checkpoint(ckpt)
    return {"step_tokens_per_s": r.step_tokens_per_s, "wall_s": round(time.time() - t0, 1)}


def bench_training(owner: str) -> dict:
    # Alternate, best of two each: the machine's speed drifts over minutes (thermal, page cache).
    runs = {"plain": [], "flexo": [], "dp": []}
    for _ in range(2):
        runs["plain"].append(plain_loop(owner))
        runs["flexo"].append(flexo_loop(owner))
        runs["dp"].append(dp_loop(owner))
    plain = max(r["tokens_per_s"] for r in runs["plain"])
    ours = max(r["step_tokens_per_s"] for r in runs["flexo"])
    loop = max(r["loop_tokens_per_s"] for r in runs["flexo"])
    # The figure compares training steps; the loop's periodic validation (eval_every, 64 blocks each) is
    # work the plain loop does not do, reported beside it.
    return {"owner": owner, "steps": STEPS, "runs": runs, "plain_tokens_per_s": plain, "flexo_tokens_per_s": ours,
            "flexo_loop_with_validation_tokens_per_s": loop, "train_vs_plain_loop": round(ours / plain, 3),
            "loop_with_validation_vs_plain": round(loop / plain, 3),
            "dp_tokens_per_s": max(r["step_tokens_per_s"] for r in runs["dp"]),
            "dp_vs_train": round(max(r["step_tokens_per_s"] for r in runs["dp"]) / ours, 3)}


# ----------------------------------------------------------------------------------------- merge
def bench_merge(before: str | None) -> dict:
    out = ROOT / ".cache" / "bench" / "merge.json"
    cmd = [sys.executable, str(ROOT / "bench" / "merge_vs_copy.py"), "--out", "/tmp/flexo-merge-bench", "--json", str(out)]
    if before:
        tree = ROOT / ".cache" / "bench" / f"before-{before}"
        if not tree.exists():
            r = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), before],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"bench: cannot check out {before} ({r.stderr.strip()}): no 'before' merge", flush=True)
                tree = None
        if tree:
            cmd += ["--before-root", str(tree)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def bench_eval() -> dict:
    from flexo.layout import Layout
    from flexo.modeling import load_model
    from flexo.training import pack
    from flexo.tokenization import load_tokenizer

    layout = Layout.at(ROOT)
    tok = load_tokenizer(layout)
    texts = [json.loads(line)["text"] for line in open(layout.heldout("public") / "test.jsonl")]
    blocks = pack(tok, texts * 4, 256, "public test")[:32]
    figures = {}
    for name in ("public", "merged"):
        model = load_model(layout.public_model) if name == "public" else merged_or_stand_in(layout)
        model(input_ids=blocks[:8])  # warm-up
        best = 0.0
        for _ in range(2):
            t0 = time.time()
            for i in range(0, len(blocks), 8):
                model(input_ids=blocks[i:i + 8])
            best = max(best, blocks.numel() / (time.time() - t0))
        figures[f"{name}_tokens_per_s"] = round(best, 1)
        figures[f"{name}_experts"] = model.config.num_experts
        figures[f"{name}_active_experts"] = model.config.num_experts_per_tok
    figures["merged_model"] = ("models/merged" if (layout.merged / "config.json").is_file()
                               else "stand-in of the merged shape (no merge yet)")
    figures["eval_tokens_per_s_merged_over_public"] = round(figures["merged_tokens_per_s"] / figures["public_tokens_per_s"], 3)
    return figures


def bench_eval_members(documents: int = 12) -> dict:
    """The evaluate stage's BTM row and its members' own rows, the old way (BTM, then every member model
    evaluated again by lm-eval) and the new way (the member rows replay BTM's pass), same run, same
    documents; the scores must agree."""
    from flexo.baselines import BTMLM
    from flexo.evaluation import evaluate_model, load_tokenizer_for, write_domain_tasks
    from flexo.layout import Layout
    from flexo.modeling import coupled_model, load_model, read_router_row
    from flexo.params import PUBLIC, load_params
    from stages.evaluate import available_domains

    layout = Layout.at(ROOT)
    params = load_params(layout.params)
    domains = available_domains(params, layout)
    tok = load_tokenizer_for(layout.public_model, layout.tokenizer)
    tasks = write_domain_tasks(layout, domains, ROOT / ".cache" / "bench" / "tasks")
    public = load_model(layout.public_model)
    members, names = [public], [PUBLIC]
    for o in params.owners:
        folder = layout.expert(o) / "model"
        if (folder / "config.json").is_file():
            members.append(load_model(folder))
        else:  # fresh clone: an untrained 2-expert model of the same shape (the cost is the same)
            row = read_router_row(layout.router_embedding(params.owners[0]), params.model.hidden_size)
            members.append(coupled_model(public, row))
        names.append(o)
    ev = params.evaluate
    kw = dict(limit=documents, batch_size=ev.batch_size, max_length=ev.max_length, domains=domains)
    out, scores = {}, {}
    for way in ("before", "after"):
        t0 = time.time()
        btm = BTMLM(members, tokenizer=tok, names=names, batch_size=ev.batch_size, max_length=ev.max_length)
        evaluate_model(btm, None, tasks, **kw)
        btm_s = time.time() - t0
        for name, model in zip(names, members):
            lm = model if way == "before" else btm.member_lm(name)
            scores[(way, name)] = evaluate_model(lm, tok, tasks, **kw)
        out[f"{way}_s"] = round(time.time() - t0, 1)
        out[f"{way}_btm_s"] = round(btm_s, 1)
    diff = max(abs(scores[("before", n)][d] - scores[("after", n)][d]) for n in names for d in domains)
    return dict(out, members=len(members), domains=domains, documents_per_domain=documents,
                max_bpb_difference=round(diff, 8), speedup=round(out["before_s"] / out["after_s"], 2))


def merged_or_stand_in(layout) -> torch.nn.Module:
    """The demo's merged model; on a fresh clone (no merge yet) a stand-in of the same shape: the public
    model with its FFN copied into every expert (throughput depends on the shape, not the weights)."""
    from flexo.modeling import load_model, new_model, with_experts
    from flexo.params import load_params

    if (layout.merged / "config.json").is_file():
        return load_model(layout.merged)
    params = load_params(layout.params)
    public = load_model(layout.public_model)
    n = 1 + len(params.owners)
    model = new_model(with_experts(public.config, n, params.merge.top_k))
    src = public.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            s = src[key]
            value.copy_(torch.cat([s] * n) if value.shape != s.shape else s)
    return model.eval()


# -------------------------------------------------------------------------------------------- demo
def demo_figures() -> dict:
    wall = ROOT / ".cache" / "demo_wall.json"
    if not wall.is_file():
        return {"demo_wall_s": None, "note": "no .cache/demo_wall.json: run `make demo` first"}
    span = json.loads(wall.read_text())
    stages = {}
    timings = ROOT / ".cache" / "timings.jsonl"
    if timings.is_file():
        for line in timings.read_text().splitlines():
            row = json.loads(line)
            finished = datetime.strptime(row["finished"], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
            # `process:<stage>` lines time whole `flexo` processes (imports included); the others the stage alone.
            if row["stage"].startswith("process:") and span["started"] <= finished <= span["finished"] + 1:
                stages[row["stage"].removeprefix("process:")] = row["wall_s"]
    return {"demo_wall_s": span["finished"] - span["started"],
            "demo_started": datetime.fromtimestamp(span["started"], timezone.utc).isoformat(timespec="seconds"),
            "stages_s": dict(sorted(stages.items(), key=lambda kv: -kv[1])),
            "stages_sum_s": round(sum(stages.values()), 1)}


# ------------------------------------------------------------------------------------------ report
def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "safetensors", "lm_eval", "dvc", "prefect")}


def machine() -> str:
    mem = ""
    try:
        kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def render(report: dict) -> str:
    t, m, e, d = report["training"], report["merge"], report["eval"], report["demo"]
    lines = [f"# flexo benchmarks, {report['date']}", "",
             f"- machine: {report['machine']}", f"- command: `{report['command']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             "| figure | value | goal | measured as |", "|---|---:|---|---|",
             f"| train_vs_plain_loop | {t['train_vs_plain_loop']} | ≥ 0.9 | {t['flexo_tokens_per_s']:.0f} vs "
             f"{t['plain_tokens_per_s']:.0f} tok/s, {t['steps']} steps of train-expert ({t['owner']}); with the loop's "
             f"periodic validation included {t['flexo_loop_with_validation_tokens_per_s']:.0f} tok/s = "
             f"{t['loop_with_validation_vs_plain']} |",
             *([f"| dp_vs_train | {t['dp_vs_train']} | (cost of DP-SGD) | {t['dp_tokens_per_s']:.0f} vs "
                f"{t['flexo_tokens_per_s']:.0f} tok/s: train-expert's DP-SGD loop (ε = 8; one backward pass per "
                f"sampled document, its own gradient clipped, noise, public text mixed in) vs its ordinary loop, "
                f"{t['steps']} steps each |"] if "dp_vs_train" in t else []),
             f"| merge_vs_copy | {m['merge_vs_copy']} | ≥ 0.8 | {m['merge_bytes_per_s'] / 1e6:.0f} vs "
             f"{m['cp_bytes_per_s'] / 1e6:.0f} MB/s on {m['input_bytes'] / 1e9:.2f} GB ({m['experts']} experts) |",
             f"| merge_peak_rss_over_largest_input | {m['merge_peak_rss_over_largest_input']} | ≤ 1.5 | "
             f"{m['merge_peak_rss_bytes'] / 1e9:.2f} GB peak over a {m['largest_input_bytes'] / 1e6:.0f} MB file "
             f"(imports alone: {m['import_only_rss_bytes'] / 1e9:.2f} GB) |",
             f"| eval_tokens_per_s_merged_over_public | {e['eval_tokens_per_s_merged_over_public']} | (cost of the MoE) | "
             f"{e['merged_tokens_per_s']:.0f} vs {e['public_tokens_per_s']:.0f} tok/s forward, "
             f"{e['merged_experts']} experts top-{e['merged_active_experts']} vs dense |",
             f"| demo_wall_s | {d.get('demo_wall_s')} | (≈ 15 min budget) | last `make demo` ({d.get('demo_started', '-')}) |", ""]
    if "before" in m:
        b = m["before"]
        change = b["merge_s"] / m["merge_s"]
        # Runs of the same merge on this machine differ by up to ~15% (disk and page cache): only a larger
        # change is called one.
        verdict = (f"the rewrite is {change:.2f}× as fast" if abs(change - 1) > 0.15 else
                   f"no change beyond run-to-run noise (±15% here; this run {b['merge_s']} s → {m['merge_s']} s, "
                   f"{change:.2f}×): timed until `sync`, the merge is bound by the disk, not by the checks it "
                   "used to repeat")
        lines += ["## The merge rewrite (before → after, same inputs, same run)", "", f"Verdict: {verdict}.", "",
                  "| | before | after |", "|---|---:|---:|",
                  f"| merge wall (s) | {b['merge_s']} | {m['merge_s']} |",
                  f"| merge / cp | {b['merge_vs_copy']} | {m['merge_vs_copy']} |",
                  f"| peak RSS (GB) | {b['merge_peak_rss_bytes'] / 1e9:.2f} | {m['merge_peak_rss_bytes'] / 1e9:.2f} |",
                  f"| peak RSS / largest input | {b['merge_peak_rss_over_largest_input']} | {m['merge_peak_rss_over_largest_input']} |",
                  "", f"Before = git {report['before']}: the streaming merge through torch (every tensor "
                  "deserialised by safetensors into a torch tensor, checked, serialised again; torch and "
                  "transformers imported by the process). After: the same stream as bytes (flexo/weights.py: "
                  "headers parsed, each tensor's byte range read with one positioned read, NaN/Inf and scale "
                  "checked through a numpy view, no torch or transformers import); the outputs are the same "
                  "bytes (tests/stages/test_merge_bytes.py).", ""]
    if "eval_members" in report:
        em = report["eval_members"]
        lines += ["## The evaluate stage: BTM's members no longer run twice (before → after, same run)", "",
                  "The slowest stage of the demo is `evaluate`. Its profile (`eval_s` of the evaluate line in .cache/timings.jsonl) "
                  "showed the BTM row costing as much as its five members' own rows together, and each member "
                  "model running the same windows twice: once inside BTM, once for its own row (`public`, "
                  "`expert:*`). Now BTM records every member's own document log-likelihoods and those rows "
                  "replay them (lm-eval still builds the requests and computes bits-per-byte).", "",
                  "| | before | after |", "|---|---:|---:|",
                  f"| BTM + {em['members']} member rows, {em['documents_per_domain']} documents × "
                  f"{len(em['domains'])} domains (s) | {em['before_s']} | {em['after_s']} |",
                  f"| of which BTM itself (s) | {em['before_btm_s']} | {em['after_btm_s']} |", "",
                  f"Speed-up {em['speedup']}×; largest bits-per-byte difference between the two ways "
                  f"{em['max_bpb_difference']}.", ""]
        if report.get("evaluate_stage"):
            es = report["evaluate_stage"]
            lines += [f"Whole `flexo evaluate` stage on the demo's models (process wall, run one after the other "
                      f"on {es['date']}): **{es['before_s']} s → {es['after_s']} s**; every score identical to "
                      "6 decimals.", ""]
    if d.get("stages_s"):
        lines += ["## Where the demo's time goes (process wall per stage, imports included)", "",
                  "| stage | s |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in d["stages_s"].items()]
        lines += [f"| (sum of stages) | {d['stages_sum_s']} |", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="git revision whose merge is timed as 'before'")
    ap.add_argument("--skip-merge", action="store_true", help="reuse .cache/bench/merge.json")
    ap.add_argument("--owner", default="code", help="owner whose train-expert step is timed")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown report from results/bench.json")
    a = ap.parse_args()
    if a.render:
        if not (ROOT / "results" / "bench.json").is_file():
            raise SystemExit("bench: error: --render needs results/bench.json: run `make bench` first")
        report = json.loads((ROOT / "results" / "bench.json").read_text())
        md = ROOT / "results" / f"bench-{report['date']}.md"
        md.write_text(render(report))
        print(md.read_text())
        return
    started = time.time()
    now = datetime.now(timezone.utc)
    report = {"date": now.strftime("%Y-%m-%d"), "started": now.isoformat(timespec="seconds"), "machine": machine(),
              "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]), "versions": versions(),
              "before": a.before}
    print("bench: merge vs cp (builds ≥ 2 GB of synthetic packages)", flush=True)
    report["merge"] = (json.loads((ROOT / ".cache/bench/merge.json").read_text()) if a.skip_merge
                       else bench_merge(a.before))
    print("bench: training loop vs plain loop", flush=True)
    report["training"] = bench_training(a.owner)
    print("bench: evaluation throughput", flush=True)
    report["eval"] = bench_eval()
    print("bench: BTM and its members' rows, before and after the replay", flush=True)
    report["eval_members"] = bench_eval_members()
    report["demo"] = demo_figures()
    # The whole-stage before/after: two `flexo evaluate` runs on the demo's models, one after the other
    # (their .cache/timings.jsonl lines, kept in the repository).
    stage = ROOT / "docs" / "bench" / "evaluate_stage.json"
    if stage.is_file():
        report["evaluate_stage"] = json.loads(stage.read_text())
    report["bench_wall_s"] = round(time.time() - started, 1)
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    md = out / f"bench-{report['date']}.md"
    md.write_text(render(report))
    print(md.read_text())


if __name__ == "__main__":
    main()
