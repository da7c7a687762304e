"""GPU device check: a merged FlexOlmo model served by vLLM and evaluated with lm-eval's vLLM backend.

    python bench/gpu_serve.py [--model DIR]      # on a GPU machine with vllm and lm-eval installed
    python bench/gpu_serve.py --dry-run          # CPU: the same task files and lm-eval run, HF backend, tiny model

Without --model it builds a random 5-expert merged model (public + 4 owners, top-2) of configs/olmo2-1b.yaml's
shape, saved as flexo saves merged models, with a small tokenizer trained here (the GPU machine reaches no hub).
Then:
1. vLLM's offline engine (flexo/vllm_engine.py, as `flexo serve --engine vllm` runs it) completes 64 prompts of
   32 tokens each: completion tokens/s;
2. lm-eval's `vllm` backend scores a rolling-loglikelihood task written by flexo's own `write_domain_tasks`
   (bits per byte on 16 documents of Python stdlib text), and the same task through lm-eval's `hf` backend on
   the same GPU: the two must agree (random weights make the number meaningless; the agreement is the check).
A missing vllm or lm-eval is recorded in the figures with its reason and exits 0 (bench/gpu.sh goes on).
Figures: $OUT/gpu_serve.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def documents(n: int) -> list[str]:
    import sysconfig

    files = sorted((Path(sysconfig.get_path("stdlib")) / "json").glob("*.py"))
    files += sorted((Path(sysconfig.get_path("stdlib")) / "email").glob("*.py"))
    return [f.read_text(encoding="utf-8")[:3000] for f in files[:n]]


def random_merged_model(folder: Path, *, tiny: bool, device: str) -> Path:
    """A random merged model (flexo's config: softmax over all experts, top-2 kept, no renormalisation)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from flexo.modeling import model_config, new_model, with_experts, write_meta
    from flexo.params import ModelParams, load_params

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(documents(40), trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>")
    m = ModelParams(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128) if tiny else \
        load_params(ROOT / "configs" / "olmo2-1b.yaml").model
    cfg = with_experts(model_config(m, vocab_size=len(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id), 5, 2)
    torch.manual_seed(0)
    with torch.device(device):
        model = new_model(cfg)
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    write_meta(folder, {"kind": "merged", "experts": ["public", "a", "b", "c", "d"], "fingerprint": "random",
                        "top_k": 2, "num_experts": 5})
    return folder


def lm_eval_bpb(backend: str, model_dir: Path, tasks_dir: Path, device: str) -> float:
    import lm_eval

    from flexo.evaluation import task_name

    args = {"hf": f"pretrained={model_dir},dtype=float32,device={device}",
            "vllm": f"pretrained={model_dir},dtype=bfloat16,gpu_memory_utilization=0.4,max_model_len=1024"}[backend]
    with contextlib.chdir(tasks_dir):  # the task YAMLs name their data relative to their own folder
        out = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=[task_name("public")],
                                      task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks_dir)),
                                      batch_size=4, log_samples=False)
    return float(out["results"][task_name("public")]["bits_per_byte,none"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a merged flexo model folder (default: random)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, lm-eval's hf backend only")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    figures: dict = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    missing = [name for name in ("lm_eval",) if importlib.util.find_spec(name) is None]
    if not args.dry_run:
        if not cuda:
            print("no CUDA GPU visible: use --dry-run on CPU", file=sys.stderr)
            return 2
        missing += [name for name in ("vllm",) if importlib.util.find_spec(name) is None]
    with tempfile.TemporaryDirectory(prefix="flexo-gpu-serve-") as tmp:
        tmp = Path(tmp)
        if missing:
            figures["skipped"] = f"not importable here: {', '.join(missing)} (install them where the GPU is)"
        else:
            from flexo.evaluation import write_domain_tasks
            from flexo.layout import Layout

            model_dir = args.model or random_merged_model(tmp / "merged", tiny=args.dry_run, device=device)
            layout = Layout.at(tmp / "project")
            held = layout.heldout("public")
            held.mkdir(parents=True)
            (held / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(16)))
            tasks = write_domain_tasks(layout, ["public"], tmp / "tasks")
            figures["hf_bpb"] = round(lm_eval_bpb("hf", model_dir, tasks, device), 4)
            if not args.dry_run:
                from flexo.vllm_engine import VllmServer

                engine = VllmServer(model_dir, dtype="bfloat16", gpu_memory_utilization=0.4, max_model_len=1024)
                prompts = [[5 + i, 9, 17] for i in range(64)]
                t0 = time.time()
                made = sum(e["completion_tokens"] for p in prompts for e in engine.complete(p, max_tokens=32)
                           if e["type"] == "done")
                figures["vllm_completion_tokens_per_s"] = round(made / (time.time() - t0), 1)
                del engine
                figures["vllm_bpb"] = round(lm_eval_bpb("vllm", model_dir, tasks, device), 4)
                figures["vllm_vs_hf_bpb_abs_diff"] = round(abs(figures["vllm_bpb"] - figures["hf_bpb"]), 4)
    print(json.dumps(figures, indent=2))
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / ("gpu_serve_dry.json" if args.dry_run else "gpu_serve.json")).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
