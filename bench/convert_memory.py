"""Peak memory of `model.init_from` conversion against the checkpoint's size, today and before.

    .venv/bin/python bench/convert_memory.py [--hidden 2048 --layers 2 --vocab 100352 --before 8a2bc32]

Writes a synthetic bf16 OLMo-2 checkpoint of OLMo-2-1B's width and vocabulary (random weights, its own small
tokenizer), then converts it in a fresh process each way and records the peak RSS (getrusage of a wrapper):
- today: flexo/checkpoint.py's `write_public_model` (streams tensor by tensor, keeps bf16);
- before: `convert_checkpoint` of commit --before (every tensor in memory, then an fp32 model), run from an
  extracted copy of that commit's tree.
Also the peak of a bare process that imports the same modules (the baseline both include). Writes
docs/bench/convert-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.merge_vs_copy import peak_rss_bytes  # noqa: E402

MODEL = "{{'init_from': {ckpt!r}, 'hidden_size': {h}, 'num_layers': {layers}, 'num_heads': 16, " \
        "'intermediate_size': {inter}, 'max_seq_len': 256, 'rms_norm_eps': 1e-6, 'rope_theta': 500000.0}}"

TODAY = """
import sys, torch
from flexo.params import params_from_dict
from flexo.checkpoint import read_source, write_public_model
params = params_from_dict({{'model': {model}}})
source = read_source(params)
row = torch.zeros({h}, dtype=torch.bfloat16).view(torch.uint8).numpy()
if sys.argv[1] == 'convert':
    write_public_model(source, row, __import__('pathlib').Path(sys.argv[2]), 500_000_000)
"""

BEFORE = """
import sys, pathlib
sys.path.insert(0, {tree!r})
import torch
from transformers import AutoTokenizer
from flexo.params import params_from_dict
import stages.train_public as tp
assert tp.__file__.startswith({tree!r}), tp.__file__
params = params_from_dict({{'model': {model}}})
tok = AutoTokenizer.from_pretrained({ckpt!r})
if sys.argv[1] == 'convert':
    tp.convert_checkpoint(pathlib.Path({ckpt!r}), params, tok)
"""


def write_checkpoint(folder: Path, h: int, layers: int, inter: int, vocab: int) -> int:
    import torch
    from safetensors.torch import save_file
    from transformers import Olmo2Config

    from tests.conftest import own_tokenizer

    folder.mkdir(parents=True)
    tok = own_tokenizer()
    cfg = Olmo2Config(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-6, max_position_embeddings=4096,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({f"{p}self_attn.{n}_proj.weight": (h, h) for n in "qkvo"})
        shapes.update({f"{p}self_attn.q_norm.weight": (h,), f"{p}self_attn.k_norm.weight": (h,),
                       f"{p}post_attention_layernorm.weight": (h,), f"{p}post_feedforward_layernorm.weight": (h,),
                       f"{p}mlp.gate_proj.weight": (inter, h), f"{p}mlp.up_proj.weight": (inter, h),
                       f"{p}mlp.down_proj.weight": (h, inter)})
    # Two shards, as real checkpoints come: the embeddings in one, the rest in the other.
    first = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items() if "embed" in k}
    save_file(first, folder / "model-00001-of-00002.safetensors")
    del first
    rest = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items() if "embed" not in k}
    save_file(rest, folder / "model-00002-of-00002.safetensors")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=100352)
    ap.add_argument("--before", default="8a2bc32", help="the commit whose convert_checkpoint is measured as before")
    args = ap.parse_args()
    h, layers, inter, vocab = args.hidden, args.layers, args.intermediate, args.vocab
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="flexo-convert-") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "ckpt"
        size = write_checkpoint(ckpt, h, layers, inter, vocab)
        largest = vocab * h * 2
        model = MODEL.format(ckpt=str(ckpt), h=h, layers=layers, inter=inter)
        tree = tmp / "before"
        tree.mkdir()
        subprocess.run(f"git archive {args.before} | tar -x -C {tree}", shell=True, cwd=ROOT, check=True)
        figures = {}
        for name, code in [("today", TODAY.format(model=model, h=h)),
                           ("before", BEFORE.format(model=model, tree=str(tree), ckpt=str(ckpt)))]:
            for mode in ("imports", "convert"):
                out = tmp / f"out-{name}"
                out.mkdir(exist_ok=True)
                r, peak = peak_rss_bytes([sys.executable, "-c", code, mode, str(out)], env=env, cwd=tmp)
                if r.returncode:
                    raise SystemExit(f"{name} {mode} failed:\n{r.stderr[-2000:]}")
                figures[f"{name}_{mode}_peak_gb"] = round(peak / 1e9, 3)
                print(f"[convert] {name} {mode}: peak RSS {peak / 1e9:.2f} GB", flush=True)
        written = sum(f.stat().st_size for f in (tmp / "out-today").glob("*.safetensors"))
    report = {
        "date": date.today().isoformat(), "machine": f"{os.cpu_count()} cores",
        "command": "python bench/convert_memory.py " + " ".join(sys.argv[1:]),
        "checkpoint": {"hidden": h, "layers": layers, "intermediate": inter, "vocab": vocab, "dtype": "bf16",
                       "bytes": size, "largest_tensor_bytes": largest},
        "written_bytes": written, **figures,
        "today_above_imports_gb": round(figures["today_convert_peak_gb"] - figures["today_imports_peak_gb"], 3),
        "before_above_imports_gb": round(figures["before_convert_peak_gb"] - figures["before_imports_peak_gb"], 3),
    }
    out = ROOT / "docs" / "bench" / f"convert-{report['date']}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    gb = 1e9
    out.with_suffix(".md").write_text(
        f"# Checkpoint conversion memory ({report['date']}, {report['machine']})\n\n"
        f"`{report['command']}`: a synthetic bf16 OLMo-2 checkpoint (width {h}, {layers} layers, vocabulary {vocab}; "
        f"{size / gb:.2f} GB in two shards, largest tensor {largest / gb:.2f} GB), converted into flexo's public "
        "model in a fresh process; peak RSS from getrusage.\n\n"
        "| conversion | peak RSS | above its imports | output |\n|---|---:|---:|---|\n"
        f"| today (flexo/checkpoint.py, streamed) | {figures['today_convert_peak_gb']:.2f} GB | "
        f"{report['today_above_imports_gb']:.2f} GB | bf16, {written / gb:.2f} GB |\n"
        f"| before ({args.before}: every tensor loaded, fp32 model) | {figures['before_convert_peak_gb']:.2f} GB | "
        f"{report['before_above_imports_gb']:.2f} GB | fp32 model in memory |\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
