"""`make bench-growth`: how flexo's costs grow with the number of owners (issue 24). Writes
docs/bench/growth-<date>.md and .json.

    .venv/bin/python bench/growth.py [--scales 4 16 64] [--default-fit-scales 4] [--keep]

Synthetic owners, no training: owner i of n (`o000`, `o001`, …) is a copy of demo owner i mod T (the
demo's owners whose package, router statistics and curated splits exist), its package tensors plus
1e-3 × a seeded Gaussian (re-saved with `ExpertPackage.write`, so owner and tensors_sha256 are right)
and its router statistics' means shifted by a seeded random vector of a quarter of their spread (so no
two owners are the same class and the federated fit can separate them). Each scale is a scratch project
in .cache/growth/<n>/ (params.yaml with those owners, dvc.yaml, its own `dvc init --no-scm`, copies of
the public artifacts and of the code DVC hashes), where every figure is a fresh process of the real
CLI, timed (wall) with its peak RSS (getrusage of a wrapper process, as bench/merge_vs_copy.py does):

- merge             `flexo --root P merge` (best of three; bytes written, MB/s, model size)
- router_tune_*     `flexo --root P router-tune`: with a reduced fit (router_tune.fit_samples/fit_steps
                    of FAST_FIT, a params file beside P's) at every scale, and with params.yaml's own fit at
                    --default-fit-scales only (its cost grows too fast to run at 64: see the report)
- optout_*          `flexo --root P opt-out --model P/models/merged[-rt] --exclude o000 --out TMP` (best of three)
- status*           `flexo --root P status [--json]`, before any dvc.lock and after `dvc commit -f`
- dvc_*             `dvc status` in P before and after `dvc commit -f` (timed too), then a no-op `dvc repro`
- eval_*            forward tokens/s of P/models/merged at merge.top_k, 8×256 tokens of public held-out
                    text, best of 5 forwards in each of 3 processes, torch.no_grad, 2 torch threads (load time, peak RSS)
- router fit profile   one Adam step of the federated fit (flexo.router_fit.multinomial_rows) and one
                    class's Gaussian samples, in-process at the class counts of each scale, from which the
                    default router-tune at the scales not run is estimated

Each figure's growth exponent is the least-squares slope of log(figure) against log(owners). Needs the
demo's artifacts (`make demo` first); writes nothing outside .cache/growth/, /tmp/flexo-growth/ and
docs/bench/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BIN = Path(sys.executable).parent
FLEXO = [str(BIN / "flexo")]
DVC = [str(BIN / "dvc")]
SCRATCH = ROOT / ".cache" / "growth"
TMP = Path("/tmp/flexo-growth")
# The reduced federated fit run at every scale (params.yaml: fit_samples 4000, fit_steps 300).
FAST_FIT = {"fit_samples": 100, "fit_steps": 10}
MERGE_RUNS = OPTOUT_RUNS = 3
EVAL_BATCH, EVAL_SEQ, EVAL_RUNS, EVAL_PROCESSES = 8, 256, 5, 3
# The environment `make` gives every command (Makefile exports), for runs outside make.
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "DS_ACCELERATOR": "cpu", "TRANSFORMERS_VERBOSITY": "error"}

# Runs argv[1:] (a fresh wrapper per command, since RUSAGE_CHILDREN keeps the maximum over every child a
# process ever waited for) and writes its peak RSS (KiB), wall seconds and exit status to $GROWTH_MARK.
WRAPPER = ("import json, os, resource, subprocess, sys, time\n"
           "t = time.perf_counter()\n"
           "limit = float(os.environ.get('GROWTH_TIMEOUT') or 0) or None\n"
           "try:\n"
           "    rc = subprocess.run(sys.argv[1:], timeout=limit).returncode\n"
           "except subprocess.TimeoutExpired:\n"
           "    rc = 124\n"
           "wall = time.perf_counter() - t\n"
           "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
           "open(os.environ['GROWTH_MARK'], 'w').write(json.dumps({'rss_kib': rss, 'wall_s': wall, 'rc': rc}))\n"
           "sys.exit(rc)")


def say(msg: str) -> None:
    print(f"growth: {msg}", flush=True)


# ------------------------------------------------------------------------------------------ running
def timed(name: str, cmd: list[str], *, cwd: Path, log_dir: Path, timeout: float = 900, check: bool = True) -> dict:
    """Wall seconds, peak RSS and exit status of one fresh process running `cmd`; its output goes to a log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log, mark = log_dir / f"{name}.log", log_dir / f"{name}.mark"
    mark.unlink(missing_ok=True)
    env = {**ENV, **os.environ, "GROWTH_MARK": str(mark), "GROWTH_TIMEOUT": str(timeout),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", WRAPPER, *cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    m = json.loads(mark.read_text())
    r = {"wall_s": round(m["wall_s"], 3), "peak_rss_bytes": m["rss_kib"] * 1024, "rc": m["rc"], "log": str(log)}
    if m["rc"] == 124:
        r["timed_out_after_s"] = timeout
    if check and m["rc"] != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{name} failed (exit {m['rc']}): {' '.join(cmd)}\n{tail}")
    return r


def last_json(log: str) -> dict:
    """The last line of a log that is a JSON object (what a child of this script printed)."""
    for line in reversed(Path(log).read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in {log}")


def folder_bytes(path: Path, pattern: str = "*") -> int:
    # Through symbolic links (after `dvc commit` with cache.type symlink the files are links into the cache).
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


# ----------------------------------------------------------------------------------- the demo's artifacts
def demo_templates() -> tuple[list[str], list[str]]:
    """The demo owners a synthetic owner can copy (package, router statistics, curated splits, held-out
    split and router row present), and those left out with the reason."""
    from flexo.layout import Layout
    from flexo.params import load_params

    layout = Layout.at(ROOT)
    ok, left = [], []
    for owner in load_params(layout.params).owners:
        need = {"expert package": layout.expert(owner) / "expert.json",
                "router statistics": layout.router_update(owner).with_suffix(".json"),
                "curated splits": layout.curated(owner) / "manifest.json",
                "held-out split": layout.heldout(owner) / "test.jsonl",
                "router row": layout.router_embedding(owner)}
        missing = [what for what, path in need.items() if not path.is_file()]
        (left.append(f"{owner} (no {', '.join(missing)})") if missing else ok.append(owner))
    for what, path in {"public model": layout.public_model / "flexo.json", "tokenizer": layout.tokenizer / "tokenizer.json",
                       "public split": layout.curated("public") / "train.jsonl",
                       "public held-out split": layout.heldout("public") / "test.jsonl",
                       "public router row": layout.router_embedding("public")}.items():
        if not path.is_file():
            raise SystemExit(f"growth: error: no {what} ({path}): run `make demo` first")
    if not ok:
        raise SystemExit(f"growth: error: no demo owner has all its artifacts ({'; '.join(left)}): run `make demo` first")
    return ok, left


# ------------------------------------------------------------------------------------ a scratch project
def owner_names(n: int) -> list[str]:
    return [f"o{i:03d}" for i in range(n)]


def build_project(n: int, templates: list[str]) -> Path:
    """.cache/growth/<n>/: a project of n synthetic owners over the demo's public artifacts."""
    import torch
    from safetensors.torch import load_file, save_file

    from flexo.package import ExpertPackage
    from flexo.params import validate_owner_name

    P = SCRATCH / str(n)
    shutil.rmtree(P, ignore_errors=True)
    P.mkdir(parents=True)
    # Its own DVC repository (no git), inside the main project's ignored .cache/.
    dvc = {**ENV, **os.environ}
    subprocess.run([*DVC, "init", "--no-scm", "-q"], cwd=P, check=True, env=dvc)
    for key, value in (("core.analytics", "false"), ("core.check_update", "false"),
                       # `dvc commit` links the outputs into the cache instead of copying gigabytes.
                       ("cache.type", "symlink")):
        subprocess.run([*DVC, "config", key, value], cwd=P, check=True, env=dvc)
    names = owner_names(n)
    for name in names:
        validate_owner_name(name, "growth owner")
    params = (ROOT / "params.yaml").read_text()
    params, subs = re.subn(r"(?m)^owners:.*$", f"owners: [{', '.join(names)}]   # synthetic (bench/growth.py)", params)
    assert subs == 1, "params.yaml has no one-line `owners:` entry"
    (P / "params.yaml").write_text(params)
    fast = re.sub(r"(?m)^(  fit_samples:)\s*\d+", rf"\1 {FAST_FIT['fit_samples']}", params)
    fast = re.sub(r"(?m)^(  fit_steps:)\s*\d+", rf"\1 {FAST_FIT['fit_steps']}", fast)
    (P / "params-fastfit.yaml").write_text(fast)
    shutil.copy(ROOT / "dvc.yaml", P / "dvc.yaml")
    # The code DVC hashes as dependencies: a snapshot, so that others' edits do not make stages stale.
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for code in ("flexo", "stages"):
        shutil.copytree(ROOT / code, P / code, ignore=ignore)
    # Public artifacts (copies: a DVC cache must not own the main project's files).
    for rel in ("models/public", "models/tokenizer", "data/curated/public", "data/heldout/public"):
        shutil.copytree(ROOT / rel, P / rel)
    (P / "models" / "router").mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(ROOT / "models/router" / f"public{suffix}", P / "models/router" / f"public{suffix}")
    # The demo's evaluation outputs, so that every stage has its outputs for `dvc commit`.
    for rel in ("results/lm_eval", "results/tasks/domains", "results/routing"):
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, P / rel)
    for rel in ("results/table.md", "results/optout.md", "results/metrics.json", "results/bpb.png", "results/optout.png"):
        if (ROOT / rel).is_file():
            shutil.copy(ROOT / rel, P / rel)
    for sub in ("models/experts", "models/router_updates", "results/scores", "results/extraction"):
        (P / sub).mkdir(parents=True, exist_ok=True)

    cache: dict[str, tuple] = {}
    for i, name in enumerate(names):
        t = templates[i % len(templates)]
        if t not in cache:
            pkg = json.loads((ROOT / "models/experts" / t / "expert.json").read_text())
            stats_path = ROOT / "models/router_updates" / f"{t}.safetensors"
            cache[t] = (load_file(ROOT / "models/experts" / t / "expert.safetensors"), pkg, load_file(stats_path),
                        json.loads(stats_path.with_suffix(".json").read_text()))
        tensors, pkg, stats, info = cache[t]
        g = torch.Generator().manual_seed(1000 + i)
        # The package: every tensor + 1e-3 × N(0, 1), seeded by the owner's index.
        noisy = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype).contiguous()
                 for k, v in sorted(tensors.items())}
        meta = {k: v for k, v in pkg.items() if k not in ("format", "tensors_sha256")}
        ExpertPackage.write(P / "models/experts" / name, noisy, dict(meta, owner=name))
        # Router statistics: each layer's mean shifted by a quarter of the per-coordinate spread.
        moved = {}
        for k, v in stats.items():
            if k.endswith(".mean"):
                layer = k[: -len(".mean")]
                d = v.numel()
                if f"{layer}.cov" in stats:
                    var = float(stats[f"{layer}.cov"].diagonal().sum()) / d
                else:
                    vals, rest = stats[f"{layer}.eigvals"], float(stats[f"{layer}.rest"])
                    var = (float(vals.sum()) + rest * (d - vals.numel())) / d
                v = (v + 0.25 * math.sqrt(max(var, 0.0)) * torch.randn(v.shape, generator=g)).to(v.dtype)
            moved[k] = v.contiguous()
        save_file(moved, str(P / "models/router_updates" / f"{name}.safetensors"),
                  metadata={"format": "flexo-router-stats-v2"})
        (P / "models/router_updates" / f"{name}.json").write_text(json.dumps(dict(info, owner=name), indent=2) + "\n")
        # What the owner's other stages left (for `dvc commit`): its inbox, splits, router row, reports.
        inbox = P / "data/owners" / name
        inbox.mkdir(parents=True)
        (inbox / ".gitkeep").touch()
        shutil.copytree(ROOT / "data/curated" / t, P / "data/curated" / name)
        shutil.copytree(ROOT / "data/heldout" / t, P / "data/heldout" / name)
        for suffix in (".safetensors", ".json"):
            shutil.copy(ROOT / "models/router" / f"{t}{suffix}", P / "models/router" / f"{name}{suffix}")
        for kind in ("scores", "extraction"):
            src = ROOT / "results" / kind / f"{t}.json"
            if not src.is_file():  # a demo owner without a report: any owner's will do for DVC
                src = next((ROOT / "results" / kind).glob("*.json"), None)
            if src is not None:
                shutil.copy(src, P / "results" / kind / f"{name}.json")
    return P


# ------------------------------------------------------------------------------------------ the figures
def eval_child(P: Path) -> None:
    """(Child process) forward tokens/s of P/models/merged on a fixed batch; prints one JSON line."""
    import gc

    import torch

    from flexo.layout import Layout
    from flexo.modeling import load_model
    from flexo.tokenization import load_tokenizer
    from flexo.training import pack

    torch.set_num_threads(2)
    layout = Layout.at(P)
    tok = load_tokenizer(layout)
    texts = [json.loads(line)["text"] for line in (layout.heldout("public") / "test.jsonl").read_text().splitlines()]
    blocks = pack(tok, texts * 4, EVAL_SEQ, "public test")[:EVAL_BATCH]
    # Loaded twice: the first load also pays for the first touch of fresh memory (slow on this VM when the
    # memory was handed back to the host); the second reuses it.
    loads = []
    for _ in range(2):
        model = None
        gc.collect()
        t = time.perf_counter()
        model = load_model(layout.merged)
        loads.append(time.perf_counter() - t)
    best = math.inf
    with torch.no_grad():
        model(input_ids=blocks)  # warm-up
        for _ in range(EVAL_RUNS):
            t = time.perf_counter()
            model(input_ids=blocks)
            best = min(best, time.perf_counter() - t)
    print(json.dumps({"tokens": blocks.numel(), "best_forward_s": round(best, 4),
                      "tokens_per_s": round(blocks.numel() / best, 1), "first_load_s": round(loads[0], 3),
                      "load_s": round(loads[1], 3),
                      "experts": model.config.num_experts, "top_k": model.config.num_experts_per_tok,
                      "threads": torch.get_num_threads()}))


def fit_profile_child(classes: list[int], samples: int, steps: int) -> None:
    """(Child process) seconds per Adam step of the federated router fit and per class's Gaussian samples
    (one layer), at each class count, on one thread as router-tune runs it; prints one JSON line."""
    import torch

    from flexo.router_fit import gaussian_samples, multinomial_rows

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    d = 384
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    cov, mean = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64), torch.zeros(d)
    for _ in range(2):  # warm-up (the first call of a kernel is slow)
        gaussian_samples(mean, cov, samples, g)
    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        gaussian_samples(mean, cov, samples, g)
    sample_s = (time.perf_counter() - t) / reps
    step_s = {}
    multinomial_rows([torch.randn(samples, d, generator=g) for _ in range(3)], l2=1e-3, steps=2, lr=1e-2)
    for c in classes:
        xs = [torch.randn(samples, d, generator=g) + 2 * torch.randn(d, generator=g) for _ in range(c)]
        # The difference of a 1-step and a (1+steps)-step call, best of two each: the per-step cost without
        # the per-call setup.
        def best(k: int, xs: list = xs) -> float:
            times = []
            for _ in range(2):
                t = time.perf_counter()
                multinomial_rows(xs, l2=1e-3, steps=k, lr=1e-2)
                times.append(time.perf_counter() - t)
            return min(times)
        step_s[c] = max(best(1 + steps) - best(1), 0.0) / steps
    print(json.dumps({"samples": samples, "steps_timed": steps, "hidden": d, "sample_s_per_class_layer": sample_s,
                      "step_s": step_s}))


def graph_profile_child(P: Path) -> None:
    """(Child process) the cost of `flexo status`'s rerun plan on P's stage graph (flexo.pipeline_graph):
    `downstream()` of one stage, and rerun_plan's loop when every owner's train_expert stage changed (an
    edit to flexo/training.py, flexo/modeling.py or flexo/router_fit.py) and when every stage did; prints
    one JSON line."""
    from flexo.pipeline_graph import stage_graph

    graph = stage_graph(P)

    def loop(changed: list[str]) -> float:
        t = time.perf_counter()
        rerun = set(changed)
        for name in changed:  # as flexo/pipeline_graph.py rerun_plan does
            rerun |= graph.downstream(name)
        return round(time.perf_counter() - t, 4)

    t = time.perf_counter()
    graph.downstream(graph.order[0])
    one = time.perf_counter() - t
    experts = [s for s in graph.order if s.startswith("train_expert@")]
    print(json.dumps({"stages": len(graph.order), "edges": sum(len(v) for v in graph.deps.values()),
                      "one_downstream_s": round(one, 5), "train_experts_changed_loop_s": loop(experts),
                      "all_changed_loop_s": loop(list(graph.order))}))


def wait_quiet(limit_s: float = 180, load: float = 1.8) -> float:
    """Wait (at most `limit_s`) until the 1-minute load average is below `load`: another job on a 2-core
    machine slows every figure. Returns the seconds waited."""
    t = time.time()
    while os.getloadavg()[0] >= load and time.time() - t < limit_s:
        time.sleep(10)
    waited = time.time() - t
    if waited >= 10:
        say(f"waited {waited:.0f} s for the machine to quieten (load average {os.getloadavg()[0]:.1f})")
    return round(waited, 1)


def measure_scale(n: int, templates: list[str], *, default_fit: bool, log_root: Path) -> dict:
    logs = log_root / str(n)
    waited = wait_quiet()
    t = time.time()
    say(f"{n} owners: building the scratch project (.cache/growth/{n})")
    P = build_project(n, templates)
    fig: dict = {"owners": n, "build_s": round(time.time() - t, 1), "load_average_before": os.getloadavg(),
                 "waited_for_quiet_s": waited}
    say(f"{n} owners: built in {fig['build_s']} s")
    run = lambda name, cmd, **kw: timed(name, cmd, cwd=ROOT, log_dir=logs, **kw)
    flexo = [*FLEXO, "--root", str(P)]
    fig["input_bytes"] = folder_bytes(P / "models/experts", "*.safetensors") + folder_bytes(P / "models/public", "*.safetensors")
    fig["router_update_bytes"] = (P / "models/router_updates" / "o000.safetensors").stat().st_size  # what an owner ships

    # 1. merge (best of three; each replaces the last).
    runs = []
    for k in range(MERGE_RUNS):
        subprocess.run(["sync"], check=False)
        runs.append(run(f"merge-{k}", [*flexo, "merge"]))
    best = min(runs, key=lambda r: r["wall_s"])
    merged = P / "models/merged"
    written = folder_bytes(merged)
    fig["merge"] = dict(best, runs_s=[r["wall_s"] for r in runs], peak_rss_bytes=max(r["peak_rss_bytes"] for r in runs),
                        bytes_written=written, mb_per_s=round(written / best["wall_s"] / 1e6, 1))
    fig["model_bytes"] = folder_bytes(merged, "*.safetensors")
    say(f"{n} owners: merge {best['wall_s']:.1f} s (runs {fig['merge']['runs_s']}), {written / 1e9:.3f} GB written, "
        f"{fig['merge']['mb_per_s']} MB/s, peak RSS {fig['merge']['peak_rss_bytes'] / 1e9:.2f} GB")

    # 2. router-tune: the reduced fit everywhere (it makes merged-rt for the opt-out), params.yaml's where asked.
    r = run("router-tune-fastfit", [*FLEXO, "--root", str(P), "--params", str(P / "params-fastfit.yaml"), "router-tune"],
            timeout=1200, check=False)
    fig["router_tune_fastfit"] = r
    say(f"{n} owners: router-tune (fit_samples {FAST_FIT['fit_samples']}, fit_steps {FAST_FIT['fit_steps']}) "
        f"{r['wall_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, exit {r['rc']}")
    rt = P / "models/merged-rt"
    if (rt / "flexo.json").is_file():
        for name in ("router_refits", "router_stats"):
            if (rt / f"{name}.safetensors").is_file():
                fig[f"{name}_bytes"] = (rt / f"{name}.safetensors").stat().st_size
    if default_fit:
        r = run("router-tune-default", [*flexo, "router-tune"], timeout=1800, check=False)
        fig["router_tune_default"] = r
        say(f"{n} owners: router-tune (params.yaml's fit) {r['wall_s']:.1f} s, peak RSS "
            f"{r['peak_rss_bytes'] / 1e9:.2f} GB, exit {r['rc']}")

    # 3. opt-out of one owner, from the plain merge and from the router-tuned model (a refit).
    out = TMP / str(n)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for key, model in (("optout_merged", merged), ("optout_rt", rt)):
        if not (model / "flexo.json").is_file():
            fig[key] = {"skipped": f"no {model.name} (router-tune failed)"}
            continue
        runs = []
        for k in range(OPTOUT_RUNS):  # best of three, each replacing the last (an earlier opt-out may be replaced)
            subprocess.run(["sync"], check=False)
            runs.append(run(f"{key}-{k}", [*flexo, "opt-out", "--model", str(model), "--exclude", "o000",
                                           "--out", str(out / key)]))
        r = min(runs, key=lambda x: x["wall_s"])
        fig[key] = dict(r, runs_s=[x["wall_s"] for x in runs], peak_rss_bytes=max(x["peak_rss_bytes"] for x in runs),
                        bytes_written=folder_bytes(out / key))
        say(f"{n} owners: opt-out from {model.name} {r['wall_s']:.1f} s (runs {fig[key]['runs_s']}), peak RSS "
            f"{fig[key]['peak_rss_bytes'] / 1e9:.2f} GB")
    shutil.rmtree(out, ignore_errors=True)

    # 4. evaluation throughput of the merged model: three processes, the fastest kept (another torch job on the
    #    machine can slow a 2-thread forward several times over: OpenMP threads spin for cores).
    evals = []
    for k in range(EVAL_PROCESSES):
        r = run(f"eval-{k}", [sys.executable, str(Path(__file__).resolve()), "--eval-child", str(P)])
        evals.append(dict(r, **last_json(r["log"])))
    fig["eval"] = dict(max(evals, key=lambda e: e["tokens_per_s"]),
                       processes_tokens_per_s=[e["tokens_per_s"] for e in evals],
                       processes_load_s=[[e["first_load_s"], e["load_s"]] for e in evals],
                       load_s=min(min(e["first_load_s"], e["load_s"]) for e in evals),
                       peak_rss_bytes=max(e["peak_rss_bytes"] for e in evals))
    say(f"{n} owners: forward {fig['eval']['tokens_per_s']:.0f} tok/s ({fig['eval']['experts']} experts, "
        f"top-{fig['eval']['top_k']}; processes {fig['eval']['processes_tokens_per_s']}), load {fig['eval']['load_s']:.1f} s, "
        f"peak RSS {fig['eval']['peak_rss_bytes'] / 1e9:.2f} GB")

    # 5. status and DVC: first with no dvc.lock (every stage new), then after `dvc commit -f` (up to date).
    dvc_in_p = lambda name, args, **kw: timed(name, [*DVC, *args], cwd=P, log_dir=logs, **kw)
    for state in ("fresh", "committed"):
        if state == "committed":
            r = dvc_in_p("dvc-commit", ["commit", "-f", "-q"], timeout=1200, check=False)
            fig["dvc_commit"] = r
            lock = P / "dvc.lock"
            if lock.is_file():
                text = lock.read_text()
                fig["dvc_lock_bytes"] = len(text.encode())
                fig["dvc_lock_lines"] = text.count("\n")
                # items of an `owners:` list recorded as a stage's params (merge, evaluate, every score@owner)
                fig["dvc_lock_owner_list_lines"] = len(re.findall(r"(?m)^\s+- o\d{3}$", text))
            say(f"{n} owners: dvc commit -f {r['wall_s']:.1f} s, exit {r['rc']}; dvc.lock "
                f"{fig.get('dvc_lock_bytes', 0) / 1e6:.2f} MB, {fig.get('dvc_lock_lines')} lines, of which "
                f"{fig.get('dvc_lock_owner_list_lines')} owner-list items")
        r = dvc_in_p(f"dvc-status-{state}", ["status"], check=False)
        text = Path(r["log"]).read_text(errors="replace")
        r["up_to_date"] = "up to date" in text
        r["stages_listed"] = len(re.findall(r"(?m)^\S[^\n]*:\s*$", text))
        fig[f"dvc_status_{state}"] = r
        for key, extra in ((f"status_{state}", []), (f"status_json_{state}", ["--json"])):
            fig[key] = run(key, [*flexo, "status", *extra], check=False)
        say(f"{n} owners ({state}): dvc status {fig[f'dvc_status_{state}']['wall_s']:.2f} s "
            f"({'up to date' if r['up_to_date'] else str(r['stages_listed']) + ' stages listed'}), flexo status "
            f"{fig[f'status_{state}']['wall_s']:.2f} s, --json {fig[f'status_json_{state}']['wall_s']:.2f} s")
    if fig["dvc_status_committed"]["up_to_date"]:
        r = dvc_in_p("dvc-repro-noop", ["repro"], timeout=900, check=False)
        text = Path(r["log"]).read_text(errors="replace")
        r["noop"] = "up to date" in text and "Running stage" not in text
        fig["dvc_repro_noop"] = r
        say(f"{n} owners: no-op dvc repro {r['wall_s']:.2f} s (no-op: {r['noop']})")
    else:
        fig["dvc_repro_noop"] = {"skipped": "dvc status was not clean after `dvc commit -f`: a repro would run stages"}
        say(f"{n} owners: no-op dvc repro skipped (dvc status not clean after commit; see {logs})")
    # A code change that every owner's train_expert and router_update depend on (P's snapshot of flexo/, not
    # the project's): what `flexo status` shows after a flexo upgrade, 2n + 1 stages changed.
    with open(P / "flexo" / "router_fit.py", "a") as f:
        f.write("\n# bench/growth.py: a code change\n")
    r = dvc_in_p("dvc-status-codechange", ["status"], check=False)
    fig["dvc_status_codechange"] = r
    fig["status_codechange"] = run("status_codechange", [*flexo, "status"], check=False)
    say(f"{n} owners (flexo/router_fit.py changed): dvc status {r['wall_s']:.2f} s, flexo status "
        f"{fig['status_codechange']['wall_s']:.2f} s")
    r = run("graph-profile", [sys.executable, str(Path(__file__).resolve()), "--graph-profile-child", str(P)], check=False)
    if r["rc"] == 0:
        fig["graph"] = last_json(r["log"])
        g = fig["graph"]
        say(f"{n} owners: stage graph {g['stages']} stages, {g['edges']} edges; one downstream() "
            f"{g['one_downstream_s'] * 1e3:.1f} ms; rerun loop with every train_expert changed "
            f"{g['train_experts_changed_loop_s']:.2f} s, with every stage changed {g['all_changed_loop_s']:.2f} s")
    fig["scratch"] = str(P)
    fig["load_average_after"] = os.getloadavg()
    return fig


# ------------------------------------------------------------------------------------------ analysis
def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx, 3)


def dig(d: dict, path: str):
    """d["a"]["b"] for "a.b", when it is a number (else None)."""
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


# (key in the table, path in a scale's figures, unit, what it is, whether it is a cost that should not
# grow faster than the merged model's size)
FIGURES = [
    ("model_bytes", "model_bytes", "GB", "merged model size (safetensors bytes)", False),
    ("merge_s", "merge.wall_s", "s", "`flexo merge` wall (best of 3)", True),
    ("merge_rss", "merge.peak_rss_bytes", "GB", "`flexo merge` peak RSS", True),
    ("merge_mb_per_s", "merge.mb_per_s", "MB/s", "merge bytes written / wall", False),
    ("router_tune_fastfit_s", "router_tune_fastfit.wall_s", "s",
     f"`flexo router-tune`, reduced fit (fit_samples {FAST_FIT['fit_samples']}, fit_steps {FAST_FIT['fit_steps']})", True),
    ("router_tune_fastfit_rss", "router_tune_fastfit.peak_rss_bytes", "GB", "its peak RSS", True),
    ("router_tune_default_s", "router_tune_default.wall_s", "s", "`flexo router-tune`, params.yaml's fit", True),
    ("router_refits_bytes", "router_refits_bytes", "MB",
     "merged-rt/router_refits.safetensors", True),
    ("router_stats_bytes", "router_stats_bytes", "MB",
     "merged-rt/router_stats.safetensors", True),
    ("optout_merged_s", "optout_merged.wall_s", "s", "`flexo opt-out` of one owner from models/merged (best of 3)", True),
    ("optout_merged_rss", "optout_merged.peak_rss_bytes", "GB", "its peak RSS", True),
    ("optout_rt_s", "optout_rt.wall_s", "s", "`flexo opt-out` of one owner from models/merged-rt (refit; best of 3)", True),
    ("optout_rt_rss", "optout_rt.peak_rss_bytes", "GB", "its peak RSS", True),
    ("status_s", "status_committed.wall_s", "s", "`flexo status` (after `dvc commit`)", True),
    ("status_json_s", "status_json_committed.wall_s", "s", "`flexo status --json` (after `dvc commit`)", True),
    ("status_rss", "status_committed.peak_rss_bytes", "GB", "`flexo status` peak RSS", True),
    ("status_fresh_s", "status_fresh.wall_s", "s", "`flexo status` (no dvc.lock yet)", True),
    ("dvc_status_s", "dvc_status_committed.wall_s", "s", "`dvc status` (after `dvc commit`, up to date)", True),
    ("dvc_status_fresh_s", "dvc_status_fresh.wall_s", "s", "`dvc status` (no dvc.lock yet)", True),
    ("dvc_commit_s", "dvc_commit.wall_s", "s", "`dvc commit -f` (hashes every output)", True),
    ("dvc_repro_noop_s", "dvc_repro_noop.wall_s", "s", "no-op `dvc repro`", True),
    ("status_codechange_s", "status_codechange.wall_s", "s",
     "`flexo status` after an edit of flexo/router_fit.py (2n+1 stages changed)", True),
    ("dvc_status_codechange_s", "dvc_status_codechange.wall_s", "s", "`dvc status` after that edit", True),
    ("graph_edges", "graph.edges", "edges", "dependency edges of the stage graph (flexo.pipeline_graph)", True),
    ("rerun_loop_experts_s", "graph.train_experts_changed_loop_s", "s",
     "rerun_plan's downstream loop, every train_expert changed (in-process)", True),
    ("rerun_loop_all_s", "graph.all_changed_loop_s", "s", "rerun_plan's downstream loop, every stage changed (in-process)", True),
    ("dvc_lock_bytes", "dvc_lock_bytes", "MB", "dvc.lock after `dvc commit -f`", True),
    ("dvc_lock_owner_list_lines", "dvc_lock_owner_list_lines", "lines",
     "of its lines, items of an `owners:` list (the params of merge, evaluate and each score@owner)", True),
    ("eval_tokens_per_s", "eval.tokens_per_s", "tok/s", "merged model forward tokens/s (8×256, top-k, 2 threads)", False),
    ("eval_s_per_mtok", None, "s/Mtok", "its inverse: forward seconds per million tokens", True),
    ("eval_load_s", "eval.load_s", "s", "`load_model(models/merged)`, best of 6 (2 in each process)", True),
    ("eval_rss", "eval.peak_rss_bytes", "GB", "evaluation process peak RSS", True),
]
SCALE = {"GB": 1e9, "MB": 1e6}


def figure_values(scales: list[dict]) -> dict[str, list]:
    out = {}
    for key, path, _, _, _ in FIGURES:
        if path is None:  # the inverse of throughput
            out[key] = [1e6 / v if v else None for v in out["eval_tokens_per_s"]]
        else:
            out[key] = [dig(s, path) for s in scales]
    return out


def analyse(report: dict) -> None:
    """Every figure's values by scale and its growth exponents (all scales, last two)."""
    owners = [s["owners"] for s in report["scales"]]
    report["values"] = vals = figure_values(report["scales"])
    report["exponents"] = {k: {"all": slope(owners, v), "last": slope(owners[-2:], v[-2:]) if len(owners) >= 2 else None}
                           for k, v in vals.items()}


def predicted_default_router_tune(profile: dict, n: int, layers: int, fit_steps: int) -> float:
    """The federated fit's compute in `flexo router-tune` at params.yaml's settings for n owners: one fit of
    n+1 classes, then store_refits' n fits of n classes (each owner's opt-out), every fit `layers` × (one
    class's Gaussian samples per class + fit_steps Adam steps)."""
    step, sample = profile["step_s"], profile["sample_s_per_class_layer"]
    fit = lambda c: layers * (c * sample + fit_steps * step[str(c)])
    return fit(n + 1) + n * fit(n)


# ------------------------------------------------------------------------------------------ report
def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "safetensors", "dvc")}


def machine() -> str:
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def code_state() -> dict:
    def git(*args):
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return r.stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--short", "--", "flexo", "stages", "bench").splitlines()}


def fmt(v, unit: str) -> str:
    if v is None:
        return "–"
    v = v / SCALE.get(unit, 1)
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


# Where the cost comes from, from reading the code and profiling the 64-owner project (cProfile of one
# process each, 2026-12-03) — shown with the figures that the measurement flags.
RT_FIT = ("`flexo router-tune` (router_tune.method federated, the default; stages/router_tune.py `_fit_federated`) "
          "fits every router row as one multinomial logistic regression over C = n+1 classes "
          "(flexo/router_fit.py `fit_router` → `multinomial_rows`): each Adam step computes the logits of all "
          "C·fit_samples Gaussian samples against C−1 rows and loops over the classes in Python, so one fit costs "
          "O(C²·fit_samples·d·fit_steps) per layer, after drawing fit_samples Gaussian samples per class "
          "(`gaussian_samples`: a float64 copy, a Cholesky factorisation of the d×d covariance and a randn, per class "
          "per layer). Then `store_refits` (flexo/refit.py) precomputes every single owner's opt-out refit: n more "
          "full fits of n classes, each redrawing every class's samples from scratch (the Cholesky factors are not "
          "kept between refits). In all n+1 fits: O(n³) Adam work and n(n+1)·layers Cholesky factorisations.")


def _router_stats_text(report: dict) -> str:
    scales = report["scales"]
    a, b = scales[-2], scales[-1]
    if "router_stats_bytes" not in a or "router_stats_bytes" not in b:
        return NO_EXPLANATION
    per_owner = (b["router_stats_bytes"] - a["router_stats_bytes"]) / (b["owners"] - a["owners"])
    shipped = b.get("router_update_bytes")
    text = (f"router_stats.safetensors (flexo/refit.py `embed_stats`, written by router-tune) keeps every class's "
            f"statistics for an exact opt-out refit: {per_owner / 1e6:.2f} MB more per owner")
    if shipped and per_owner > 2 * shipped:
        return text + (f", against the {shipped / 1e6:.3f} MB the owner ships (models/router_updates): the covariances "
                       "are kept dense (d×d per layer, expanded by `dense()` in flexo/router_stats.py), so the file is "
                       f"{per_owner / shipped:.0f}× what the owners sent, and grows with d²·layers: at a real FlexOlmo width "
                       "(d = 4096, 32 layers) about 2 GB per owner.")
    return text + (f", about what the owner ships ({shipped / 1e6:.3f} MB): linear in owners; it outgrows the model "
                   "only because the model's shared weights dilute its growth at these sizes." if shipped else ".")


EXPLAIN = {
    "router_tune_default_s": RT_FIT,
    "router_tune_fastfit_s": (
        RT_FIT + " With the reduced fit what remains is mostly the O(n²) part: profiled at 64 owners (fit_samples "
        "100, fit_steps 10), 86 of 107 s were `store_refits`' 64 refits, of which 45 s were 16,644 `gaussian_samples` "
        "calls (65·4 for the fit + 64·64·4 for the refits; 18 s of Cholesky, 11 s of randn) and 42 s "
        "`multinomial_rows` (the per-class loop and its backward)."),
    "router_tune_fastfit_rss": (
        "router-tune loads the merged model in float32 (`load_model`), writes it again with `save_pretrained`, and "
        "holds every class's dense d×d covariances (`dense()` in flexo/router_stats.py) during the fit."),
    "router_refits_bytes": (
        "router_refits.safetensors holds, for each of the n owners, the refitted router of every layer without "
        "that owner (n rows of d floats): n² rows, written by `store_refits` (flexo/refit.py). `flexo opt-out` of "
        "the tuned model loads the whole file (`read_refit` → `load_file`) to use one owner's rows."),
    "router_stats_bytes": _router_stats_text,
    "optout_rt_s": (
        "`flexo opt-out` of the router-tuned model imports torch, reads the stored refit (`read_refit` loads all of "
        "router_refits.safetensors, O(n²) bytes) and rewrites router_stats.safetensors without the owner "
        "(`keep_embedded`, O(n)), besides moving the weights' bytes."),
    "dvc_lock_bytes": (
        "dvc.lock has one entry per stage (5 + 6n stages) and the whole `owners` list inside n + 2 of them "
        "(dvc_lock_owner_list_lines), so it grows as O(n) + O(n²); every `dvc status`, `dvc repro` and "
        "`flexo status` parses it (flexo twice more with PyYAML's pure-Python loader, flexo/owners.py `read_lock`, "
        "once in stages/status.py and once in `withdrawal_plan`)."),
    "dvc_lock_owner_list_lines": (
        "dvc.yaml's `score` stage (one per owner) depends on the params key `owners`, as merge and evaluate do, so "
        "dvc.lock records the whole owner list in each score@<owner> entry: n(n+2) lines. Beyond the quadratic "
        "file, any owner joining or leaving makes every owner's score stage stale: `dvc repro` after the "
        "(n+1)-th owner joins rescores all n+1 owners (score@X scores every model, and the set of models changes)."),
    "graph_edges": (
        "Each score@X stage (dvc.yaml `score`, one per owner; merge and evaluate too) depends on the models/experts "
        "folder, which holds the output of every train_expert@Y stage, so the stage graph has O(n²) edges: DVC "
        "builds and checks them on every `dvc status`/`repro`, and flexo/pipeline_graph.py walks them (below)."),
    "rerun_loop_experts_s": (
        "flexo/pipeline_graph.py `rerun_plan` calls `StageGraph.downstream(name)` for every changed stage, and "
        "`downstream` recomputes `upstream(s)` (a graph walk over O(n²) edges) for every stage s: O(changed · S · E) "
        "= O(n⁴) when O(n) stages changed, as after any edit of flexo/training.py, flexo/modeling.py or "
        "flexo/router_fit.py (every train_expert@X depends on them). One reverse walk from the changed stages "
        "(or the transitive closure computed once) is O(S + E)."),
    "status_s": (
        "`flexo status` (stages/status.py) is `dvc status`'s work and more: flexo/pipeline_graph.py `rerun_plan` opens "
        "the DVC repo, builds the stage graph from `repo.index`, then `repo.status()` builds the index again "
        "(dvc.yaml's foreach and dvc.lock parsed twice by ruamel, profiled at 64 owners); DVC reads params.yaml once "
        "per stage that has params (dvc/dependency/param.py `read_param_file`: 391 parses at 64 owners); flexo parses "
        "dvc.lock twice more with PyYAML's pure-Python loader (flexo/owners.py `read_lock`, from stages/status.py and "
        "`withdrawal_plan`); and with many stages changed, `rerun_plan`'s downstream loop (rerun_loop_*)."),
    "dvc_status_s": (
        "`dvc status` checks 5 + 6n stages: for each it parses params.yaml again (dvc/dependency/param.py "
        "`read_param_file`, 391 times at 64 owners) and looks up its dependencies' hashes; dvc.yaml's foreach "
        "expansion, the O(n²)-edge stage graph and dvc.lock (growing faster than linearly, dvc_lock_bytes) "
        "come on top."),
    "dvc_repro_noop_s": "A no-op `dvc repro` does `dvc status`'s work for every stage in graph order (see dvc_status_s).",
    "dvc_commit_s": ("`dvc commit -f` hashes every output (models/experts, models/merged and models/merged-rt grow "
                     "linearly in owners) and writes dvc.lock, which grows faster (dvc_lock_bytes)."),
    "merge_s": (
        "`flexo merge` (stages/merge.py, flexo/weights.py) reads each input tensor's bytes once with one pread, checks "
        "them through a numpy view and appends them to the output shard, while a second thread hashes every package: "
        "linear in the bytes moved (profiled at 64 owners: 1.2 s, mostly write, pread and waiting on the hashing "
        "thread). A figure above linear here comes from the machine (the page cache, another job), not the code: "
        "compare the runs in the JSON."),
    "optout_merged_s": (
        "`flexo opt-out` of the plain merge moves the kept experts' bytes like the merge (flexo/weights.py): linear in "
        "the model's size."),
    "eval_s_per_mtok": (
        "At top-k = 2 the compute per token does not depend on the number of experts, but transformers' eager "
        "`FlexOlmoExperts.forward` (flexo.modeling `load_model` asks for experts_implementation=\"eager\") builds a "
        "one-hot mask of [tokens, k, experts+1] and loops in Python over every expert hit, one small matmul pair "
        "and an index_add_ each: per-expert overhead × experts."),
    "eval_load_s": (
        "`load_model` (transformers 5) reads flexo's per-expert keys and converts them to the fused expert "
        "tensors (MergeModulelist: torch.stack, then Concatenate of gate and up: two copies per layer), linear "
        "in the model's bytes: profiled in a quiet process at 64 owners, 0.57 s, of which 0.27 s torch.stack and "
        "0.17 s torch.cat. A figure above linear comes from this VM's memory (the first touch of fresh memory) or "
        "another job: compare processes_load_s in the JSON."),
    "eval_rss": "The evaluation process holds the whole float32 model plus the conversion's copies: linear in the model's size.",
}
EXPLAIN.update({"status_json_s": EXPLAIN["status_s"], "status_fresh_s": EXPLAIN["status_s"],
                "status_codechange_s": EXPLAIN["status_s"], "dvc_status_fresh_s": EXPLAIN["dvc_status_s"],
                "dvc_status_codechange_s": EXPLAIN["dvc_status_s"], "optout_rt_rss": EXPLAIN["optout_rt_s"],
                "rerun_loop_all_s": EXPLAIN["rerun_loop_experts_s"]})
NO_EXPLANATION = "no explanation recorded: see the logs in .cache/growth/logs/<n>/ and profile it."


def render(report: dict) -> str:
    owners = [s["owners"] for s in report["scales"]]
    vals, exps = report["values"], report["exponents"]
    last = f"{owners[-2]}→{owners[-1]}" if len(owners) > 1 else "last two"
    lines = [f"# flexo as the federation grows: {', '.join(map(str, owners))} owners, {report['date']}", "",
             f"- machine: {report['machine']}",
             f"- command: `{report['command']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"- code: git {report['code']['commit']}" + (f", with uncommitted changes in "
                                                          f"{', '.join(l.split()[-1] for l in report['code']['uncommitted'])}"
                                                          if report["code"]["uncommitted"] else ""),
             f"- owners: synthetic, owner i a perturbed copy of demo owner i mod {len(report['templates'])} "
             f"({', '.join(report['templates'])})" + (f"; left out: {'; '.join(report['templates_left_out'])}"
                                                     if report["templates_left_out"] else ""),
             f"- wall of the whole run: {report['bench_wall_s']:.0f} s", "",
             "Every figure not marked in-process is a fresh process of the real CLI in a scratch project per scale "
             "(`.cache/growth/<n>/`), "
             "wall seconds and peak RSS (see the docstring of bench/growth.py). Exponent: least-squares slope of "
             f"log(figure) vs log(owners) over the scales measured; {last}: the slope between the last two points. "
             "**Bold**: a finding (exponent > 1.1, or above the merged model size's + 0.1, or > 1.2 between the last two "
             "scales).", "",
             "| figure | " + " | ".join(f"{n} owners" for n in owners) + f" | exponent | {last} | what |",
             "|---|" + "---:|" * len(owners) + "---:|---:|---|"]
    for key, _, unit, what, cost in FIGURES:
        v = vals[key]
        if all(x is None for x in v):
            continue
        e = exps.get(key, {})
        name = f"**{key}**" if flagged(report, key, cost) else key
        lines.append(f"| {name} ({unit}) | " + " | ".join(fmt(x, unit) for x in v) +
                     f" | {e.get('all') if e.get('all') is not None else '–'} | "
                     f"{e.get('last') if e.get('last') is not None else '–'} | {what} |")
    lines.append("")
    pr = report.get("fit_profile")
    if pr and "error" not in pr:
        lines += ["## The default router-tune at every scale (measured where it ran, estimated where it cannot)", "",
                  f"The federated fit's cost per Adam step and per class's Gaussian samples, measured in one process "
                  f"(flexo.router_fit, 1 thread as router-tune runs it, {pr['samples']} samples per class, d = {pr['hidden']}):", "",
                  "| classes | s per Adam step (one layer) | s per class's samples (one layer) |", "|---:|---:|---:|"]
        for c, s in sorted(pr["step_s"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {c} | {s:.4f} | {pr['sample_s_per_class_layer']:.4f} |")
        lines += ["", "Estimated fit compute of `flexo router-tune` with params.yaml's fit (one fit of n+1 classes + "
                  "`store_refits`' n fits of n classes, each layers × (samples + fit_steps Adam steps)), against the "
                  "measured process wall where it ran:", "",
                  "| owners | estimated fit compute (s) | measured router-tune wall (s) |", "|---:|---:|---:|"]
        for n, est in report["router_tune_default_estimate_s"].items():
            measured = next((dig(s, "router_tune_default.wall_s") for s in report["scales"] if str(s["owners"]) == n), None)
            lines.append(f"| {n} | {est:.0f} ({est / 3600:.2f} h) | {measured if measured is not None else 'not run'} |")
        e = report["router_tune_default_estimate_exponent"]
        lines += ["", f"Estimated growth exponent of the default router-tune: {e} ({owners[0]}→{owners[-1]} owners).", ""]
    elif pr:
        lines += [f"Router fit profile failed: {pr['error']}", ""]
    if report.get("findings"):
        lines += ["## Findings", ""]
        for f in report["findings"]:
            lines.append(f"- {f}")
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""]
        lines += [f"- {n}" for n in report["notes"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def flagged(report: dict, key: str, cost: bool) -> str | None:
    """Why a cost figure is a finding (None if it is not): its exponent over every scale above 1.1 or above
    the merged model's size's + 0.1, or its exponent between the last two scales above 1.2."""
    exps = report["exponents"]
    e, last = exps.get(key, {}).get("all"), exps.get(key, {}).get("last")
    size_exp = exps.get("model_bytes", {}).get("all")
    if not cost or e is None:
        return None
    if e > 1.1:
        return f"exponent {e}: grows faster than linearly in owners"
    if size_exp is not None and e > size_exp + 0.1:
        return f"exponent {e}: grows faster than the merged model's size (exponent {size_exp})"
    if last is not None and last > 1.2:
        owners = [s["owners"] for s in report["scales"]]
        return (f"exponent {e} over all scales but {last} from {owners[-2]} to {owners[-1]} owners: faster than "
                "linearly at the larger scales")
    return None


def explain(key: str, report: dict) -> str:
    text = EXPLAIN.get(key, NO_EXPLANATION)
    return text(report) if callable(text) else text


def findings(report: dict) -> list[str]:
    vals = report["values"]
    out = []
    for key, _, unit, what, cost in FIGURES:
        why = flagged(report, key, cost)
        if why:
            v = [fmt(x, unit) for x in vals[key]]
            out.append(f"**{key}** ({what}), {why}: {' → '.join(v)} {unit}. {explain(key, report)}")
    est = report.get("router_tune_default_estimate_s") or {}
    if est:
        parts = ", ".join(f"{n} owners ≈ {s / 60:.0f} min" for n, s in est.items())
        text = (f"**router_tune_default_s** (`flexo router-tune` with params.yaml's fit): measured only where it fits the "
                f"time budget; estimated fit compute {parts} (exponent {report['router_tune_default_estimate_exponent']}).")
        if not any(f.startswith("**router_tune_default_s**") for f in out):
            out.insert(0, text + " " + explain("router_tune_default_s", report))
        else:
            out.insert(0, text)
    return out


def make_notes(report: dict) -> list[str]:
    scales = report["scales"]
    notes = []
    for s in scales:
        rt = s.get("router_tune_fastfit", {})
        if rt.get("rc"):
            notes.append(f"{s['owners']} owners: router-tune (reduced fit) exited {rt['rc']}: see {rt['log']}")
        if isinstance(s.get("dvc_repro_noop"), dict) and s["dvc_repro_noop"].get("skipped"):
            notes.append(f"{s['owners']} owners: no-op dvc repro not run: {s['dvc_repro_noop']['skipped']}")
    run_at = report.get("default_fit_scales", [])
    skipped = [s["owners"] for s in scales if s["owners"] not in run_at]
    df, ff = report["default_fit"], report["fast_fit"]
    if skipped:
        notes.append(f"router-tune with params.yaml's fit (fit_samples {df['fit_samples']}, fit_steps {df['fit_steps']}) "
                     f"was run at {run_at or 'no scale'} only (at 16 owners it would take about a quarter of an hour, "
                     f"at 64 hours: the estimate above); at {skipped} it is estimated from the fit profile. The reduced "
                     f"fit (fit_samples {ff['fit_samples']}, fit_steps {ff['fit_steps']}) runs at every scale so that "
                     "models/merged-rt exists for the opt-out figure.")
    for e in report.get("default_fit_elsewhere", []):
        notes.append(f"router-tune with params.yaml's fit, measured by a separate run at {e['owners']} owners "
                     f"(`{e['command']}`, started {e['started']}): {e['wall_s']:.0f} s, peak RSS "
                     f"{e['peak_rss_bytes'] / 1e9:.2f} GB; that run's fit-profile estimate was "
                     f"{e['estimate_s']:.0f} s. From the 4-owner run above that is an exponent of "
                     f"{slope([s['owners'] for s in scales if dig(s, 'router_tune_default.wall_s')] + [e['owners']], [dig(s, 'router_tune_default.wall_s') for s in scales if dig(s, 'router_tune_default.wall_s')] + [e['wall_s']])}.")
    ratios = [f"{s['owners']}: {s['status_committed']['wall_s'] / s['dvc_status_committed']['wall_s']:.1f}×"
              for s in scales if s.get("status_committed") and s.get("dvc_status_committed")]
    if ratios:
        notes.append("`flexo status` over `dvc status` (both up to date), by owners: " + ", ".join(ratios) + ". "
                     + EXPLAIN["status_s"])
    spread = [f"{s['owners']}: {', '.join(f'{x:.0f}' for x in s['eval']['processes_tokens_per_s'])} tok/s"
              for s in scales if s.get("eval", {}).get("processes_tokens_per_s")]
    if spread:
        notes.append("Forward throughput of each of the evaluation processes, by owners (the fastest is the figure): "
                     + "; ".join(spread) + ". A process can be several times slower than the next with nothing else "
                     "running: this VM backs memory lazily (checked by hand on 2026-12-03: filling 3 GB of fresh memory "
                     "took 7.3 s in one process, 0.55 s in the next), which is why three processes run (and the "
                     "model is loaded twice in each: `eval_load_s` is the best of the six loads).")
    notes.append("Load average (1, 5, 15 min) before each scale: " + "; ".join(
        f"{s['owners']}: {', '.join(f'{x:.1f}' for x in s['load_average_before'])}" for s in scales) +
        " (2 cores: another job running at the same time slows every figure, the forward throughput most; each "
        "scale first waits up to 3 min for a 1-minute load average below 1.8" +
        "".join(f"; {s['owners']} owners waited {s['waited_for_quiet_s']:.0f} s" for s in scales
                if s.get("waited_for_quiet_s")) + ").")
    changes = report.get("code_changes_during_run")
    if changes:
        notes.append("Files of flexo/ or stages/ that others changed while this ran (each scale ran the code on disk "
                     f"at its time): {', '.join(changes)}.")
    return notes


def code_snapshot() -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in ("flexo", "stages") for p in sorted((ROOT / d).rglob("*.py"))}


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[4, 16, 64], help="owner counts (default 4 16 64)")
    ap.add_argument("--default-fit-scales", type=int, nargs="*", default=[4],
                    help="scales at which router-tune also runs with params.yaml's fit (default 4: at 16 it takes "
                         "tens of minutes, at 64 hours)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch projects (.cache/growth/<n>/)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="report folder")
    ap.add_argument("--eval-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--fit-profile-child", type=int, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--graph-profile-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rewrite the markdown report (findings and notes too) from a report's JSON")
    ap.add_argument("--with-default-fit", type=Path, nargs="*", default=[], metavar="JSON",
                    help="with --render: add the params.yaml-fit router-tune measured by these other runs' reports "
                         "(e.g. `--scales 16 --default-fit-scales 16`, too long for the main run)")
    a = ap.parse_args()
    if a.eval_child:
        return eval_child(a.eval_child)
    if a.graph_profile_child:
        return graph_profile_child(a.graph_profile_child)
    if a.render:
        report = json.loads(a.render.read_text())
        for other in a.with_default_fit:
            o = json.loads(other.read_text())
            for sc in o["scales"]:
                if dig(sc, "router_tune_default.wall_s") is not None:
                    report.setdefault("default_fit_elsewhere", []).append(
                        {"owners": sc["owners"], "wall_s": sc["router_tune_default"]["wall_s"],
                         "peak_rss_bytes": sc["router_tune_default"]["peak_rss_bytes"], "command": o["command"],
                         "started": o["started"], "estimate_s": (o.get("router_tune_default_estimate_s") or {})
                         .get(str(sc["owners"]))})
        analyse(report)
        report["findings"], report["notes"] = findings(report), make_notes(report)
        a.render.write_text(json.dumps(report, indent=2) + "\n")
        a.render.with_suffix(".md").write_text(render(report))
        print(a.render.with_suffix(".md").read_text())
        return None
    from flexo.params import load_params

    params = load_params(ROOT / "params.yaml")
    if a.fit_profile_child:
        return fit_profile_child(a.fit_profile_child, params.router_tune.fit_samples, steps=8)

    started = time.time()
    now = datetime.now(timezone.utc)
    cmd = " ".join(["python", "bench/growth.py", *sys.argv[1:]])
    report = {"date": now.strftime("%Y-%m-%d"), "started": now.isoformat(timespec="seconds"), "machine": machine(),
              "command": f"make bench-growth ({cmd})" if os.environ.get("MAKELEVEL") else cmd,
              "versions": versions(), "code": code_state(), "fast_fit": FAST_FIT,
              "default_fit": {"fit_samples": params.router_tune.fit_samples, "fit_steps": params.router_tune.fit_steps},
              "top_k": params.merge.top_k}
    templates, left = demo_templates()
    report["templates"], report["templates_left_out"] = templates, left
    say(f"scales {a.scales}; synthetic owners copy {templates}" + (f" (left out: {'; '.join(left)})" if left else ""))
    log_root = SCRATCH / "logs"
    shutil.rmtree(log_root, ignore_errors=True)
    code_before = code_snapshot()  # others may edit flexo/ and stages/ while this runs: the report says so

    scales = []
    for n in sorted(a.scales):
        scales.append(measure_scale(n, templates, default_fit=n in a.default_fit_scales, log_root=log_root))
        if not a.keep:
            shutil.rmtree(SCRATCH / str(n), ignore_errors=True)
    report["scales"] = scales

    wait_quiet()
    say("router fit profile (per Adam step and per class's samples, at each scale's class counts)")
    classes = sorted({c for n in a.scales for c in (n, n + 1)})
    r = timed("fit-profile", [sys.executable, str(Path(__file__).resolve()), "--fit-profile-child", *map(str, classes)],
              cwd=ROOT, log_dir=log_root, check=False, timeout=600)
    try:
        report["fit_profile"] = last_json(r["log"]) if r["rc"] == 0 else {"error": f"exit {r['rc']}, see {r['log']}"}
    except RuntimeError as e:
        report["fit_profile"] = {"error": str(e)}
    if "error" not in report["fit_profile"]:
        layers = params.model.num_layers
        est = {str(n): round(predicted_default_router_tune(report["fit_profile"], n, layers, params.router_tune.fit_steps), 1)
               for n in sorted(a.scales)}
        report["router_tune_default_estimate_s"] = est
        report["router_tune_default_estimate_exponent"] = slope([int(n) for n in est], list(est.values()))

    analyse(report)
    report["default_fit_scales"] = sorted(a.default_fit_scales)
    report["code_changes_during_run"] = changed_files(code_before, code_snapshot())
    report["bench_wall_s"] = round(time.time() - started, 1)
    report["findings"], report["notes"] = findings(report), make_notes(report)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"growth-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(report))
    print(stem.with_suffix(".md").read_text())
    say(f"wrote {stem}.md and .json in {report['bench_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
