"""Merge throughput and memory against `cp` of the same bytes, on synthetic expert packages.

    python bench/merge_vs_copy.py --experts 8 --layers 12 --hidden 1024 --intermediate 2816 --out /tmp/mb

Builds a random public FlexOlmo (1 expert) and N expert packages of the same shapes (valid manifests,
fingerprints and sha256), then times `flexo merge` (a subprocess, peak RSS from getrusage of a fresh wrapper process) and
`cp` of the same input files, and prints/writes a JSON of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# Runs argv[1:] and prints its peak RSS (KiB, Linux) on stderr's last line: a fresh wrapper per command,
# since RUSAGE_CHILDREN keeps the maximum over every child a process ever waited for.
PEAK_RSS = ("import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:])\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(r.returncode)")


def peak_rss_bytes(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, int]:
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True, text=True, **kw)
    return r, int(r.stderr.strip().splitlines()[-1]) * 1024 if r.returncode == 0 else 0


def build_inputs(root: Path, n: int, layers: int, hidden: int, inter: int) -> tuple[Path, list[Path]]:
    from transformers import FlexOlmoConfig

    from flexo.modeling import expert_tensors, fingerprint, new_model, write_meta
    from flexo.package import ExpertPackage

    cfg = FlexOlmoConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, num_experts=1,
                         num_experts_per_tok=1, pad_token_id=1, eos_token_id=0, bos_token_id=0)
    public = root / "public"
    torch.manual_seed(0)
    model = new_model(cfg)
    model.save_pretrained(public)
    tokenizer = Path(__file__).resolve().parents[1] / "models" / "tokenizer"
    for f in tokenizer.glob("*.json"):  # a merged folder ships the public model's tokenizer
        if f.name != "manifest.json":
            shutil.copy(f, public / f.name)
    fp = fingerprint(public)
    write_meta(public, {"kind": "public", "experts": ["public"], "fingerprint": fp})
    experts = []
    for i in range(n):
        with torch.no_grad():
            for layer in model.model.layers:  # a different random expert each time
                layer.mlp.experts.gate_up_proj.normal_(0, 0.02)
                layer.mlp.experts.down_proj.normal_(0, 0.02)
        folder = root / f"owner{i}"
        ExpertPackage.write(folder, expert_tensors(model, 0), {
            "owner": f"owner{i}", "public_fingerprint": fp, "num_layers": layers,
            "hidden_size": hidden, "intermediate_size": inter})
        experts.append(folder)
    return public, experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--out", type=Path, default=Path("/tmp/flexo-merge-bench"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--shard-bytes", type=int, default=None, help="merge.shard_bytes for this run")
    ap.add_argument("--before-root", type=Path, default=None,
                    help="a checkout of an older flexo: its merge is timed too, on the same inputs")
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    t = time.time()
    public, experts = build_inputs(a.out / "in", a.experts, a.layers, a.hidden, a.intermediate)
    inputs = [p for d in [public, *experts] for p in d.glob("*.safetensors")]
    total = sum(p.stat().st_size for p in inputs)
    largest = max(p.stat().st_size for p in inputs)
    print(f"built {len(inputs)} input files, {total / 1e9:.2f} GB, in {time.time() - t:.0f}s", flush=True)

    def timed_merge(code_root: Path | None) -> tuple[float, int, dict]:
        """Wall seconds and peak RSS of one `flexo merge` process (the code at `code_root`, default ours)."""
        flexo = [sys.executable, "-m", "flexo.cli"]
        env = {**os.environ, "FLEXO_THREADS": "2"}
        if code_root:
            env["PYTHONPATH"] = str(code_root)
            flexo += ["--root", str(code_root)]
        if a.shard_bytes:
            import yaml

            params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
            params["merge"]["shard_bytes"] = a.shard_bytes
            (a.out / "params.yaml").write_text(yaml.safe_dump(params))
            flexo += ["--params", str(a.out / "params.yaml")]
        shutil.rmtree(a.out / "merged", ignore_errors=True)
        cmd = [*flexo, "merge", "--public", str(public), "--expert", *map(str, experts), "--top-k", "2",
               "--out", str(a.out / "merged")]
        subprocess.run(["sync"])
        t0 = time.time()
        # From the code's own folder: `python -m` puts the working directory first on sys.path, so run from
        # this checkout the "before" merge would import this checkout's flexo whatever PYTHONPATH says.
        r, rss = peak_rss_bytes(cmd, env=env, cwd=str(code_root or ROOT))
        subprocess.run(["sync"])  # timed like cp below: until the bytes are on disk, not just in the page cache
        wall = time.time() - t0
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        return round(wall, 2), rss, json.loads((a.out / "merged" / "flexo.json").read_text())

    def best_of_two(code_root: Path | None) -> tuple[float, int, dict]:
        runs = [timed_merge(code_root) for _ in range(2)]
        return min(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2]

    before = None
    if a.before_root:
        b_s, b_rss, _ = best_of_two(a.before_root)
        before = {"merge_s": b_s, "merge_peak_rss_bytes": b_rss, "code": str(a.before_root)}
        print(f"before: merge {b_s:.1f}s, peak RSS {b_rss / 1e9:.2f} GB", flush=True)
    merge_s, merge_rss, meta = best_of_two(None)
    print(f"after: merge {merge_s:.1f}s, peak RSS {merge_rss / 1e9:.2f} GB", flush=True)
    flexo = [sys.executable, "-m", "flexo.cli"]
    baseline = subprocess.run([*flexo, "--help"], capture_output=True)  # warm imports for the baseline RSS
    # What the merge process imports before it reads a byte (flexo's CLI and the merge stage: no torch).
    _, base_rss = peak_rss_bytes([sys.executable, "-c", "import flexo.cli, stages.merge"], cwd=str(ROOT))
    subprocess.run(["sync"])
    t = time.time()
    (a.out / "copy").mkdir()
    subprocess.run(["cp", "-r", str(a.out / "in"), str(a.out / "copy" / "in")], check=True)
    subprocess.run(["sync"])
    cp_s = time.time() - t
    figures = {
        "input_bytes": total, "largest_input_bytes": largest, "experts": a.experts,
        "shape": {"layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate},
        "merge_s": merge_s, "merge_wall_in_stage_s": meta.get("wall_s"), "cp_s": round(cp_s, 2),
        "merge_bytes_per_s": round(total / merge_s), "cp_bytes_per_s": round(total / cp_s),
        "merge_vs_copy": round((total / merge_s) / (total / cp_s), 3),
        "merge_peak_rss_bytes": merge_rss, "import_only_rss_bytes": base_rss,
        "merge_peak_rss_over_largest_input": round(merge_rss / largest, 3),
        "merge_rss_above_imports_over_largest_input": round((merge_rss - base_rss) / largest, 3),
        "shards": meta.get("shards"), "shard_bytes": a.shard_bytes or "params.yaml",
    }
    if before:
        before["merge_vs_copy"] = round(cp_s / before["merge_s"], 3)
        before["merge_peak_rss_over_largest_input"] = round(before["merge_peak_rss_bytes"] / largest, 3)
        figures["before"] = before
    print(json.dumps(figures, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(a.out, ignore_errors=True)
    del baseline


if __name__ == "__main__":
    main()
