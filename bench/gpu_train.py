"""GPU device check: coupled owner training of a ~1.5B-parameter 2-expert FlexOlmo with flexo's DeepSpeed
backend (ZeRO-2, fp32 weights + bf16 autocast) on random tokens; prints tokens/s and model FLOPs
utilisation and writes the figures to $OUT/gpu_train.json (when OUT is set).

    python bench/gpu_train.py                 # on the GPU (run through bench/gpu.sh)
    python bench/gpu_train.py --dry-run       # tiny model, 2 steps, on CPU: checks the script itself
    python bench/gpu_train.py --preset configs/olmo2-1b.yaml   # a preset's shapes and per-GPU micro-batch,
                                              # peak memory beside `flexo plan`'s estimate for one GPU

The model and the recipe are the pipeline's own pieces: `flexo.modeling.model_config/new_model` (the
public model), `coupled_model` (expert 0 = public FFN, expert 1 = its copy, top-2 of 2),
`stages.train_expert.owner_trainables` (expert 1 + r_owner trained, expert 0 and r_pub masked) and
`flexo.ds_backend.train_deepspeed`. After training it checks that the public parts are bit-identical.

FLOPs: MFU = tokens/s x (6 N_active + 12 L d T) / peak, with N_active = matmul weights a token passes
through (attention, router, both experts since top-2 of 2 routes every token to both, LM head; not the
input embedding), L layers, width d, sequence T (PaLM's attention term, not halved for causality), peak =
790 TFLOP/s (H200 dense bf16). `recipe_mfu` counts what this recipe computes: frozen weights need no
weight gradient (4 FLOPs per weight per token instead of 6).

Without DeepSpeed importable (`--backend auto`), it falls back to a plain PyTorch GPU loop with the same
masks, autocast and AdamW, and says so in the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: flexo/, stages/

import torch  # noqa: E402

PEAK_TFLOPS = 790.0  # H200 dense bf16


class TimeUp(Exception):
    """Raised from the step callback when the time budget is spent (the figures so far are kept)."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model, 2 steps, CPU (a check of this script)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the timing (warm-up)")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="stop the timed loop after this long")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--lr", type=float, default=9e-4)
    ap.add_argument("--backend", choices=["auto", "deepspeed", "torch"], default="auto",
                    help="auto = deepspeed when importable, else a plain PyTorch GPU loop")
    ap.add_argument("--experts-impl", default="eager", help="transformers experts implementation (pipeline: eager)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    ap.add_argument("--preset", type=Path, default=None,
                    help="a params file (configs/olmo2-1b.yaml): its model shape, vocabulary, sequence length and "
                         "train_expert.batch_size / --preset-gpus as the micro-batch; random weights (no checkpoint)")
    ap.add_argument("--preset-gpus", type=int, default=8, help="the GPUs the preset's batch is shared by")
    args = ap.parse_args(argv)
    args.params = None
    if args.preset:
        from flexo.params import load_params

        args.params = load_params(args.preset)
        m = args.params.model
        args.hidden, args.layers, args.heads, args.intermediate = m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size
        args.seq, args.vocab = m.max_seq_len, args.params.tokenizer.vocab_size
        args.micro_batch = max(1, args.params.train_expert.batch_size // args.preset_gpus)
    if args.dry_run:
        args.steps, args.skip, args.micro_batch, args.seq = 2, 0, 2, 32
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab = 64, 2, 4, 128, 512
    return args


def flop_counts(cfg, seq: int) -> dict:
    d, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    attn = d * d * 2 + d * kv * 2  # q, o + k, v
    expert = 3 * d * inter
    experts = cfg.num_experts
    active_experts = cfg.num_experts_per_tok
    n_active = layers * (attn + experts * d + active_experts * expert) + vocab * d
    n_train = layers * (expert + d)  # expert 1 + router row r_owner
    attention = 12 * layers * d * seq
    return {
        "n_active": n_active,
        "n_trainable": n_train,
        "flops_per_token_6n": 6 * n_active + attention,
        "flops_per_token_recipe": 6 * n_train + 4 * (n_active - n_train) + attention,
    }


def torch_gpu_train(model, batches, tp, trainable, masks, on_step):
    """Fallback when DeepSpeed is missing: the pipeline's loop on the GPU, without ZeRO."""
    from flexo.training import lr_at, param_groups

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).train()
    for name, mask in masks.items():
        trainable[name].register_hook(lambda g, m=mask.to(dev): g * m)
    groups, named = param_groups(trainable, masks, set(), tp)
    opt = torch.optim.AdamW(groups, lr=tp.lr, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    total = batches.total_steps(tp)
    losses = []
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, tp)
        x = batches.batch(step).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tp.bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(named.values()), tp.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        on_step(step + 1)
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("no CUDA GPU visible: run with --dry-run on CPU, or on the GPU machine", file=sys.stderr)
        return 2
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    has_ds = importlib.util.find_spec("deepspeed") is not None
    backend = args.backend if args.backend != "auto" else ("deepspeed" if has_ds else "torch")
    if backend == "deepspeed" and not has_ds:
        print("deepspeed is not importable (carry it as wheels: see bench/gpu.sh)", file=sys.stderr)
        return 2

    import transformers

    from flexo.modeling import coupled_model, count_params, model_config, new_model
    from flexo.params import ModelParams, TrainExpertParams
    from flexo.training import Batches
    from stages.train_expert import check_public_parts_unchanged, owner_trainables

    started = time.time()
    dev = torch.device("cuda" if cuda else "cpu")
    mp = ModelParams(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                     intermediate_size=args.intermediate, max_seq_len=args.seq)
    torch.manual_seed(0)
    with dev:  # initialise on the GPU: a 1B model's random init on the host takes minutes
        cfg = model_config(mp, vocab_size=args.vocab, pad_id=1, eos_id=0)
        public = new_model(cfg)
        row = torch.nn.functional.normalize(torch.randn(args.hidden), dim=0)
        model = coupled_model(public, row)
    for m in (public, model):
        m.config._experts_implementation = args.experts_impl  # read at every forward
    public.requires_grad_(False)
    trainable, masks = owner_trainables(model)
    flops = flop_counts(model.config, args.seq)
    built = time.time() - started

    n_blocks = max(64, args.micro_batch * 8)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(2, args.vocab, (n_blocks, args.seq), generator=g)
    val_blocks = blocks[: args.micro_batch]
    tp = TrainExpertParams(epochs=1e6, max_steps=args.steps, batch_size=args.micro_batch, lr=args.lr,
                           warmup_steps=max(1, min(20, args.steps // 10)), eval_every=10**9,
                           checkpoint_every=10**9, backend=backend, bf16=True, public_mix=0.0)
    batches = Batches(blocks, tp.batch_size, tp.seed)

    stamps: list[float] = []
    t0 = time.time()

    def on_step(done):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.time())
        if done < args.steps and stamps[-1] - t0 > args.max_seconds:
            raise TimeUp()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stopped_early, result = False, None
    try:
        if backend == "deepspeed":
            from flexo.ds_backend import train_deepspeed

            with tempfile.TemporaryDirectory() as ckpt:
                result = train_deepspeed(model, batches, val_blocks, tp, trainable=trainable, grad_masks=masks,
                                         ckpt_dir=Path(ckpt) / "ckpt", key_parts={"bench": 1}, resume=False,
                                         desc="bench", on_step=on_step)
            losses = {"initial_val_loss": result.initial_val_loss, "final_val_loss": result.val_loss,
                      "final_train_loss": result.train_loss}
        else:
            losses = torch_gpu_train(model, batches, tp, trainable, masks, on_step)
    except TimeUp:
        stopped_early, losses = True, {}
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    try:
        check_public_parts_unchanged(model, public)
        identical = True
    except Exception as e:  # FlexoError: report it in the figures, do not hide the throughput
        identical, losses["public_parts_error"] = False, str(e)

    planned = None
    if args.params is not None:  # flexo plan's estimate of this very run: one GPU, this micro-batch
        from flexo.plan import Zero, expert_training, model_shape

        shape, _ = model_shape(args.params)
        t = expert_training(args.params, shape)
        mem = t.memory(Zero.of(t.tp), 1, args.micro_batch)
        planned = {"preset": str(args.preset), "states_gib": round(mem.states / 2**30, 2),
                   "activations_gib": round(mem.activations / 2**30, 2), "gpu_gib": round(mem.gpu / 2**30, 2)}
    durations = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    timed = durations[args.skip:] or durations
    tokens_per_step = args.micro_batch * args.seq
    tok_s = tokens_per_step * len(timed) / sum(timed)
    figures = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "dry_run": args.dry_run,
        "backend": backend,
        "deepspeed_importable": has_ds,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "deepspeed": _version("deepspeed"), "python": platform.python_version()},
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "intermediate": args.intermediate, "vocab": args.vocab, "experts": 2, "top_k": 2,
                  "experts_impl": args.experts_impl, "params_total": count_params(model), **flops},
        "micro_batch": args.micro_batch,
        "seq": args.seq,
        "tokens_per_step": tokens_per_step,
        "steps_run": len(stamps),
        "steps_timed": len(timed),
        "stopped_early": stopped_early,
        "step_s_mean": round(statistics.mean(timed), 4),
        "step_s_median": round(statistics.median(timed), 4),
        "tokens_per_s": round(tok_s, 1),
        "model_tflops_per_s": round(tok_s * flops["flops_per_token_6n"] / 1e12, 2),
        "mfu": round(tok_s * flops["flops_per_token_6n"] / (args.peak_tflops * 1e12), 4),
        "recipe_mfu": round(tok_s * flops["flops_per_token_recipe"] / (args.peak_tflops * 1e12), 4),
        "peak_tflops": args.peak_tflops,
        "peak_memory_gib": round(peak_mem, 2) if peak_mem is not None else None,
        "planned_memory": planned,
        "public_parts_bit_identical": identical,
        "build_s": round(built, 1),
        "wall_s": round(time.time() - started, 1),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in losses.items()},
    }
    print(json.dumps(figures, indent=2))
    print(f"\n{figures['device']}: {backend}, {figures['tokens_per_s']:.0f} tokens/s, "
          f"MFU {100 * figures['mfu']:.1f}% (6N+attention vs {args.peak_tflops:.0f} TFLOP/s), "
          f"recipe MFU {100 * figures['recipe_mfu']:.1f}%, public parts bit-identical: {identical}")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        name = "gpu_train" + (f"-{args.preset.stem}" if args.preset else "") + ("_dry" if args.dry_run else "")
        (Path(out) / f"{name}.json").write_text(json.dumps(figures, indent=2))
    return 0 if identical else 1


def _version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
