"""`make bench-serve`: a bounded load run against `flexo serve`, beside the same requests run on
`FlexoServer` directly in the same run. Writes docs/bench/serve-<date>.md and .json.

    .venv/bin/python bench/serve_load.py [--model models/merged-rt] [--requests 200] [--concurrency 8]

The server is started as users start it (`flexo serve`, its own process); the requests come from 8
concurrent clients (the official `openai` async client) in this process. Each request: a prompt cut from
a held-out test document of one domain (never training text), 32 new tokens, greedy or sampled with a
seed, excluding a rotating set of owners (none, one, two), half of them asking for per-token attribution.
Every answer is checked: HTTP 200, the right `excluded`, every excluded owner's share 0, and the greedy
answers identical to the direct run's. Figures: requests answered, latency p50/p95 (s, from send to the
whole answer), completion tokens/s over the wall time; for the direct run, the same requests one after
another through `FlexoServer.complete` (no HTTP, no queue). Needs the demo's model (`make demo`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MAX_TOKENS = 32


def requests_for(model_dir: Path, n: int) -> list[dict]:
    """n requests from the held-out test splits, with rotating exclusions and attribution."""
    experts = json.loads((model_dir / "flexo.json").read_text())["experts"]
    owners = [e for e in experts if e != "public"]
    exclusions = [[], [owners[0]], owners[1:3], [owners[-1]]]
    prompts = []
    for domain in experts:
        for line in (ROOT / "data" / "heldout" / domain / "test.jsonl").read_text().splitlines()[:20]:
            text = json.loads(line)["text"].strip()
            if len(text) > 80:
                prompts.append(text[:160])
    out = []
    for i in range(n):
        sampled = i % 3 == 2
        out.append({"prompt": prompts[(i * 7) % len(prompts)], "max_tokens": MAX_TOKENS,
                    "temperature": 0.8 if sampled else 0.0, "seed": i if sampled else None,
                    "exclude": exclusions[i % len(exclusions)], "attribution": "tokens" if i % 2 else True})
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "flexo"), "serve", "--model", str(model_dir),
                             "--port", str(port)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"flexo serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("flexo serve did not answer /health within 120 s")


async def load_run(url: str, model_id: str, reqs: list[dict], concurrency: int) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(q: dict) -> dict:
        async with gate:
            t0 = time.perf_counter()
            extra = {"exclude": q["exclude"], "attribution": q["attribution"]}
            r = await client.completions.create(model=model_id, prompt=q["prompt"], max_tokens=q["max_tokens"],
                                                temperature=q["temperature"], seed=q["seed"], extra_body=extra)
            return {"latency": time.perf_counter() - t0, "text": r.choices[0].text,
                    "tokens": r.usage.completion_tokens, "excluded": r.model_extra["excluded"],
                    "shares": r.choices[0].model_extra["attribution"]["prob_share"]}

    t0 = time.perf_counter()
    answers = await asyncio.gather(*(one(q) for q in reqs))
    return answers, time.perf_counter() - t0


def direct_run(model_dir: Path, reqs: list[dict]) -> tuple[list[dict], float]:
    from flexo.serving import FlexoServer

    server = FlexoServer(model_dir)
    server.model.eval()
    out, t0 = [], time.perf_counter()
    for q in reqs:
        t = time.perf_counter()
        ids = server.tokenizer(q["prompt"], add_special_tokens=False)["input_ids"]
        done = list(server.complete(ids, exclude=q["exclude"], max_tokens=q["max_tokens"],
                                    temperature=q["temperature"], seed=q["seed"]))[-1]
        out.append({"latency": time.perf_counter() - t, "text": done["text"], "tokens": done["completion_tokens"]})
    return out, time.perf_counter() - t0


def summary(answers: list[dict], wall: float) -> dict:
    lat = [a["latency"] for a in answers]
    tokens = sum(a["tokens"] for a in answers)
    return {"requests": len(answers), "wall_s": round(wall, 2), "latency_p50_s": round(percentile(lat, 0.5), 3),
            "latency_p95_s": round(percentile(lat, 0.95), 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(answers) / wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "merged-rt")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = ap.parse_args()
    if not (args.model / "flexo.json").is_file():
        raise SystemExit(f"bench/serve_load.py: {args.model} is missing: run `make demo` first")
    import torch

    reqs = requests_for(args.model, args.requests)
    port = free_port()
    proc = start_server(args.model, port)
    try:
        answers, wall = asyncio.run(load_run(f"http://127.0.0.1:{port}", args.model.name, reqs, args.concurrency))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    direct, direct_wall = direct_run(args.model, reqs)

    wrong = []
    for i, (q, a, d) in enumerate(zip(reqs, answers, direct)):
        if a["excluded"] != q["exclude"] or any(a["shares"][o] != 0.0 for o in q["exclude"]):
            wrong.append(f"request {i}: exclusions {a['excluded']} / shares {a['shares']}")
        if a["text"] != d["text"]:
            wrong.append(f"request {i}: served text differs from the direct run's")
    served, alone = summary(answers, wall), summary(direct, direct_wall)
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "model": str(args.model.relative_to(ROOT)),
              "concurrency": args.concurrency, "max_tokens": MAX_TOKENS, "served": served, "direct": alone,
              "served_over_direct_tokens_per_s": round(served["tokens_per_s"] / alone["tokens_per_s"], 3),
              "answers_checked": len(reqs), "mismatches": wrong,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {name} | {s['requests']} | {s['latency_p50_s']} | {s['latency_p95_s']} | {s['tokens_per_s']} | "
                     f"{s['requests_per_s']} | {s['wall_s']} |" for name, s in (("flexo serve, 8 concurrent clients", served),
                                                                             ("FlexoServer.complete, one at a time", alone)))
    stem.with_suffix(".md").write_text(f"""# `flexo serve` under load — {result['date']}

Command: `make bench-serve` (`.venv/bin/python bench/serve_load.py --requests {args.requests} --concurrency {args.concurrency}`),
model `{result['model']}`, {MAX_TOKENS} new tokens per request, exclusions rotating over none / one / two owners,
a third of the requests sampled (temperature 0.8, seeded), all with attribution (half per token). Python
{platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs.

| run | requests | p50 latency (s) | p95 latency (s) | completion tokens/s | requests/s | wall (s) |
|---|---|---|---|---|---|---|
{rows}

Served / direct tokens/s: **{result['served_over_direct_tokens_per_s']}**. Answers checked: {len(reqs)} (HTTP 200,
`excluded` as asked, every excluded owner's share exactly 0, text identical to the direct run's):
{"all correct" if not wrong else f"{len(wrong)} mismatches: " + "; ".join(wrong[:5])}.

The server runs one request at a time (the opt-out masks the model in place), so concurrency buys no
throughput: the latency a client sees is its queue wait plus its own run, and the served/direct ratio is
the cost of HTTP, JSON, the queue and per-token attribution.
""")
    print(stem.with_suffix(".md").read_text())
    if wrong:
        raise SystemExit(f"{len(wrong)} answers were wrong")


if __name__ == "__main__":
    main()
