"""The training loop shared by `train-public` and `train-expert`: packed blocks, AdamW with cosine
schedule, gradient masks for the frozen public slices, resumable checkpoints, a loss log for `dvc plots`.

Checkpoints hold tensors in safetensors and the rest in JSON (never pickle), and are tagged with a hash
of everything that determines the run, so a rerun after a crash or SIGKILL resumes exactly where the
last checkpoint left off and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from flexo.errors import FlexoError
from flexo.fsutil import atomic_dir, remove_path
from flexo.params import TrainParams

log = logging.getLogger(__name__)
LOSS_COLUMNS = ("step", "tokens", "lr", "train_loss", "val_loss")


# ------------------------------------------------------------------------------------------------ data
def pack(tokenizer, texts: list[str], seq_len: int, what: str) -> torch.Tensor:
    """Tokenise documents, join them with EOS and cut the stream into [N, seq_len] blocks."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise FlexoError(f"{what}: {len(stream)} tokens are fewer than one sequence of {seq_len}: add documents")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def set_threads() -> None:
    # One intra-op thread per core: oversubscription on a 2-core machine costs more than it gives.
    torch.set_num_threads(max(1, int(os.environ.get("FLEXO_THREADS", os.cpu_count() or 1))))


# ------------------------------------------------------------------------------------------ schedule
def lr_at(step: int, total: int, tp: TrainParams) -> float:
    if step < tp.warmup_steps:
        return tp.lr * (step + 1) / tp.warmup_steps
    progress = (step - tp.warmup_steps) / max(1, total - tp.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tp.lr * (tp.min_lr_ratio + (1 - tp.min_lr_ratio) * cosine)


@dataclass
class Batches:
    """Deterministic batch order: a seeded permutation per epoch of the main blocks, plus an optional
    share of every batch drawn (also seeded) from a second pool (public text in owner batches)."""

    blocks: torch.Tensor
    batch_size: int
    seed: int
    mix: torch.Tensor | None = None
    mix_fraction: float = 0.0

    @property
    def n_mix(self) -> int:
        return 0 if self.mix is None else min(self.batch_size - 1, round(self.batch_size * self.mix_fraction))

    @property
    def n_own(self) -> int:
        return self.batch_size - self.n_mix

    def total_steps(self, tp: TrainParams) -> int:
        steps = math.ceil(tp.epochs * len(self.blocks) / self.n_own)
        return min(steps, tp.max_steps) if tp.max_steps else steps

    def _index(self, pool: int, position: int, salt: int) -> int:
        epoch, offset = divmod(position, pool)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + salt * 7919 + epoch)
        return int(torch.randperm(pool, generator=g)[offset])

    def batch(self, step: int) -> torch.Tensor:
        own = [self._index(len(self.blocks), step * self.n_own + j, 0) for j in range(self.n_own)]
        rows = [self.blocks[i] for i in own]
        if self.n_mix:
            rows += [self.mix[self._index(len(self.mix), step * self.n_mix + j, 1)] for j in range(self.n_mix)]
        return torch.stack(rows)


# ----------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_loss: float
    val_loss: float
    initial_val_loss: float
    wall_s: float
    tokens_per_s: float
    resumed_from: int = 0
    step_tokens_per_s: float = 0.0  # the optimizer steps alone: periodic validation and checkpoints left out
    log: list[dict] = field(default_factory=list)

    # Run-dependent (how fast, and whether it resumed): kept out of every DVC-hashed output.
    RUN_DEPENDENT = ("wall_s", "tokens_per_s", "step_tokens_per_s", "resumed_from")

    def summary(self) -> dict:
        """What the training did (steps, tokens, losses): the same on any machine and any rerun."""
        d = asdict(self)
        d.pop("log")
        return {k: v for k, v in d.items() if k not in self.RUN_DEPENDENT}

    def speed(self) -> dict:
        """How this run went (wall time, tokens per second, resumed step): for flexo.timings."""
        return {k: getattr(self, k) for k in self.RUN_DEPENDENT}


def _autocast(tp: TrainParams):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=tp.bf16)


@torch.no_grad()
def val_loss(model, blocks: torch.Tensor, tp: TrainParams, max_blocks: int = 64,
             device: torch.device | None = None) -> float:
    """Mean loss over the first `max_blocks` validation blocks (on `device`, default the CPU)."""
    device = device or torch.device("cpu")
    model.eval()
    losses = []
    for i in range(0, min(len(blocks), max_blocks), tp.batch_size):
        x = blocks[i : i + tp.batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tp.bf16):
            losses.append(float(model(input_ids=x, labels=x).loss) * len(x))
    model.train()
    return sum(losses) / min(len(blocks), max_blocks)


def param_groups(trainable: dict, grad_masks: dict, no_decay, tp: TrainParams) -> tuple[list[dict], dict]:
    """AdamW groups: decay on matrices, none on masked (frozen-slice) tensors, `no_decay` and vectors.
    Returns the groups and {name: param} in optimizer order (checkpoints name state by this order)."""
    def decays(n, p):
        return n not in grad_masks and n not in no_decay and p.ndim > 1

    groups = [{"params": [p for n, p in trainable.items() if decays(n, p)], "weight_decay": tp.weight_decay},
              {"params": [p for n, p in trainable.items() if not decays(n, p)], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    order = {id(p): n for n, p in trainable.items()}
    return groups, {order[id(p)]: p for g in groups for p in g["params"]}


def run_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(ckpt: Path, key: str, step: int, named: dict[str, torch.nn.Parameter], opt, history) -> None:
    with atomic_dir(ckpt) as tmp:
        save_file({n: p.detach().contiguous() for n, p in named.items()}, str(tmp / "trainable.safetensors"))
        state = opt.state_dict()
        names = list(named)
        tensors, scalars = {}, {}
        for idx, s in state["state"].items():
            for k, v in s.items():
                if torch.is_tensor(v):
                    tensors[f"{names[idx]}::{k}"] = v.contiguous()
                else:
                    scalars[f"{names[idx]}::{k}"] = v
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {"key": key, "step": step, "param_groups": state["param_groups"], "scalars": scalars, "log": history}
        (tmp / "state.json").write_text(json.dumps(meta))


def load_checkpoint(ckpt: Path, key: str, named: dict[str, torch.nn.Parameter], opt) -> tuple[int, list] | None:
    if not (ckpt / "state.json").is_file():
        return None
    meta = json.loads((ckpt / "state.json").read_text())
    if meta.get("key") != key:
        log.warning("ignoring checkpoint %s: it belongs to a different run (params or data changed)", ckpt)
        return None
    weights = load_file(ckpt / "trainable.safetensors")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(weights[n])
    tensors = load_file(ckpt / "optimizer.safetensors")
    names = list(named)
    state: dict = {}
    for full, v in tensors.items():
        n, k = full.split("::")
        state.setdefault(names.index(n), {})[k] = v
    for full, v in meta["scalars"].items():
        n, k = full.split("::")
        state.setdefault(names.index(n), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["log"]


def begin_run(ckpt_dir: Path, key: str, named: dict, opt, *, resume: bool, desc: str,
              initial_val: Callable[[], float]) -> tuple[int, list[dict], float]:
    """(first step, loss log, initial validation loss): from the run's checkpoint when there is one and
    `resume`, else a fresh log whose first row is the untrained model's validation loss. Shared by the
    torch loop and the DeepSpeed backend, so both resume and log the same way."""
    start, history = 0, []
    if resume:
        loaded = load_checkpoint(ckpt_dir, key, named, opt)
        if loaded:
            start, history = loaded
            log.info("resuming %s from step %d", desc, start)
    first_val = history[0]["val_loss"] if history else initial_val()
    if not history:
        history.append({"step": 0, "tokens": 0, "lr": 0.0, "train_loss": float("nan"), "val_loss": first_val})
    return start, history, first_val


def log_row(done: int, tokens: int, lr: float, train_losses: list[float], tp: TrainParams, val: float) -> dict:
    """One row of loss.csv: the mean training loss since the last row and the validation loss now."""
    recent = train_losses[-tp.eval_every:]
    return {"step": done, "tokens": tokens, "lr": lr, "train_loss": sum(recent) / len(recent), "val_loss": val}


def finish_run(history: list[dict], *, steps: int, tokens: int, initial_val: float, wall: float, tokens_run: int,
               start: int, aside_s: float = 0.0) -> TrainResult:
    final = history[-1]
    return TrainResult(
        steps=steps, tokens=tokens, train_loss=final["train_loss"], val_loss=final["val_loss"],
        initial_val_loss=initial_val, wall_s=round(wall, 1),
        tokens_per_s=round(tokens_run / wall, 1) if wall > 0 else 0.0, resumed_from=start, log=history,
        step_tokens_per_s=round(tokens_run / (wall - aside_s), 1) if wall > aside_s else 0.0,
    )


def train(
    model: torch.nn.Module,
    batches: Batches,
    val_blocks: torch.Tensor,
    tp: TrainParams,
    *,
    trainable: dict[str, torch.nn.Parameter],
    grad_masks: dict[str, torch.Tensor] | None = None,
    no_decay: set[str] = frozenset(),
    ckpt_dir: Path,
    key_parts: dict,
    resume: bool = True,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `trainable` (every other parameter must already have requires_grad=False).

    `grad_masks[name]` is multiplied into that parameter's gradient (0 where the public slice must stay
    bit-identical); such parameters, and those in `no_decay`, get weight decay 0, since AdamW's decay
    would otherwise move the masked slice.
    """
    set_threads()
    torch.manual_seed(tp.seed)
    grad_masks = grad_masks or {}
    for name, mask in grad_masks.items():
        trainable[name].register_hook(lambda g, m=mask: g * m)
    groups, named = param_groups(trainable, grad_masks, no_decay, tp)
    opt = torch.optim.AdamW(groups, lr=tp.lr, betas=(0.9, 0.95), eps=1e-8)

    total = batches.total_steps(tp)
    key = run_key({**key_parts, "train": asdict(tp), "total": total})
    start, history, initial_val = begin_run(ckpt_dir, key, named, opt, resume=resume, desc=desc,
                                            initial_val=lambda: val_loss(model, val_blocks, tp))

    model.train()
    seq = batches.blocks.shape[1]
    started, tokens_run, aside_s = time.time(), 0, 0.0  # aside: validation and checkpoints
    train_losses: list[float] = []
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", mininterval=2.0)
    for step in range(start, total):
        lr = lr_at(step, total, tp)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batches.batch(step)
        with _autocast(tp):
            loss = model(input_ids=x, labels=x).loss
        if not torch.isfinite(loss.detach()):
            raise FlexoError(f"{desc}: loss became {float(loss)} at step {step}: lower the lr (now {tp.lr})")
        loss.backward()
        if tp.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(named.values()), tp.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
        tokens_run += x.numel()
        bar.update()
        bar.set_postfix(loss=f"{train_losses[-1]:.3f}")
        done = step + 1
        if done % tp.eval_every == 0 or done == total:
            t_aside = time.time()
            history.append(log_row(done, done * batches.batch_size * seq, lr, train_losses, tp,
                                   val_loss(model, val_blocks, tp)))
            aside_s += time.time() - t_aside
        if done % tp.checkpoint_every == 0 and done < total:
            t_aside = time.time()
            save_checkpoint(ckpt_dir, key, done, named, opt, history)
            aside_s += time.time() - t_aside
        if on_step:
            on_step(done)
    bar.close()
    return finish_run(history, steps=total, tokens=total * batches.batch_size * seq, initial_val=initial_val,
                      wall=time.time() - started, tokens_run=tokens_run, start=start, aside_s=aside_s)


def write_loss_log(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOSS_COLUMNS)
        w.writeheader()
        for row in history:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})


def drop_checkpoint(ckpt_dir: Path) -> None:
    remove_path(ckpt_dir)
