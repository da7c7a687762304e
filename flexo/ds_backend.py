"""The DeepSpeed training backend: `flexo.training.train`'s loop run by a DeepSpeed ZeRO-2 engine.

    select_backend(tp)(model, batches, val_blocks, tp, trainable=..., grad_masks=..., ...)

`train_deepspeed` has `train`'s signature and result, batches (`batches.batch(step)`), lr schedule
(`lr_at`), loss-log rows and checkpoint files, so the stages need not know which backend ran. What differs:

- Precision: fp32 weights + bf16 autocast (the config's `torch_autocast` section), never DeepSpeed's
  bf16 mode, which casts the module's weights to bf16 and would move the frozen public parts.
- Frozen public slices: the gradient masks are tensor hooks (`register_hook`). They run before the
  gradient is accumulated into `.grad`; ZeRO-2 reads the gradient in a post-accumulate hook
  (`register_post_accumulate_grad_hook`), so it only ever sees masked gradients
  (tests/test_ds_backend.py checks this on DeepSpeed's own gradient partition). With weight decay 0 and
  a zero gradient, AdamW leaves those entries bit-identical.
- Ranks: run as one process (distributed env defaults are set when no launcher did), or under a
  launcher (`deepspeed`, `torchrun`) as data parallel: each rank takes an equal slice of every batch,
  so a step sees the same batch and mean loss as a single process.
- ZeRO stage 3 is refused (`ds_config`): the checkpoints below read ZeRO-1/2's flat optimizer partitions.
  configs/deepspeed_zero3*.json serve `flexo plan` (flexo/plan.py) until this backend runs ZeRO-3.
- Checkpoints: flexo's safetensors + JSON format (`flexo.training.save_checkpoint/load_checkpoint`),
  not DeepSpeed's pickle checkpoints. ZeRO-2 keeps AdamW's moments in flat fp32 partitions; they are
  exported per parameter (`deepspeed.utils.safe_get_full_optimizer_state`) in torch AdamW's
  `state_dict` layout and written back into the partitions on resume, so resume restores weights, fp32
  master weights, both moments and the step count: an interrupted run ends where an uninterrupted one
  does.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from flexo.errors import FlexoError
from flexo.params import TrainParams
from flexo.training import (
    Batches, TrainResult, begin_run, finish_run, log_row, lr_at, param_groups, run_key,
    save_checkpoint, set_threads, train, val_loss,
)

log = logging.getLogger(__name__)

CONFIG_ENV = "FLEXO_DEEPSPEED_CONFIG"
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout holding configs/: params' config paths start here
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "deepspeed_zero2.json"
MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-element state (plus the scalar "step")
MAX_ZERO_STAGE = 2  # the ZeRO stages this backend runs (`ZeroAdamState` reads ZeRO-1/2's optimizer internals)


# ----------------------------------------------------------------------------------------- selection
def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def select_backend(tp: TrainParams) -> Callable[..., TrainResult]:
    """The training function for `tp.backend`: `flexo.training.train` (plain PyTorch, CPU) or
    `train_deepspeed` (DeepSpeed ZeRO-2). Both take the same arguments and return a `TrainResult`.

    "auto" picks DeepSpeed only when a CUDA GPU is visible, else plain PyTorch. Asking for DeepSpeed
    when it is not installed is a one-line FlexoError (install the `gpu` extra, or set backend: torch).
    """
    backend = tp.backend
    if backend == "auto":
        backend = "deepspeed" if torch.cuda.is_available() else "torch"
    if backend == "torch":
        return train
    if backend != "deepspeed":
        raise FlexoError(f"params.yaml: backend must be one of auto, torch, deepspeed, got {tp.backend!r}")
    if not deepspeed_available():
        raise FlexoError(
            f"params.yaml: backend {tp.backend!r} needs DeepSpeed, which is not installed: "
            "`pip install -e '.[gpu]'`, or set backend: torch"
        )
    return train_deepspeed


# -------------------------------------------------------------------------------------------- setup
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env() -> None:
    """Single-process defaults for torch.distributed when no launcher set them (without them DeepSpeed
    falls back to MPI discovery and fails on a missing mpi4py); on a machine without CUDA, DeepSpeed's
    CPU accelerator (must be chosen before deepspeed is imported)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(_free_port())
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))


def config_path(tp: TrainParams, path: Path | str | None = None) -> Path:
    """The DeepSpeed config a run of `tp` uses: `path`, else `tp.deepspeed_config` (relative to the project
    root), else $FLEXO_DEEPSPEED_CONFIG, else configs/deepspeed_zero2.json."""
    if path:
        return Path(path)
    if tp.deepspeed_config:
        return PROJECT_ROOT / tp.deepspeed_config  # an absolute path stays as it is
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def read_config(path: Path) -> dict:
    """A DeepSpeed config file as written (its "auto" values unfilled), without its `_comment`."""
    if not path.is_file():
        raise FlexoError(f"DeepSpeed config {path} is missing: point deepspeed_config in params.yaml (or "
                         f"${CONFIG_ENV}) at an existing file, or restore configs/deepspeed_zero2.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FlexoError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("zero_optimization", {}), dict):
        raise FlexoError(f"DeepSpeed config {path}: expected a JSON object with a zero_optimization object")
    cfg.pop("_comment", None)
    return cfg


def zero_stage(cfg: dict, path: Path) -> int:
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise FlexoError(f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def ds_config(tp: TrainParams, world_size: int, path: Path | None = None) -> dict:
    """The DeepSpeed config of `tp` (`config_path`) with its "auto" values filled from `tp`."""
    path = config_path(tp, path)
    cfg = read_config(path)
    stage = zero_stage(cfg, path)
    if stage > MAX_ZERO_STAGE:
        # ZeroAdamState and the unflattening after training read ZeRO-1/2's flat fp32 partitions
        # (bit16_groups, single_partition_of_fp32_groups), which ZeRO-3's optimizer does not have.
        raise FlexoError(f"DeepSpeed config {path}: zero_optimization.stage is {stage}, but flexo's "
                         f"DeepSpeed backend runs ZeRO stage <= {MAX_ZERO_STAGE} (it checkpoints ZeRO-1/2's optimizer "
                         "partitions): use configs/deepspeed_zero2.json (ZeRO-3 configs are for `flexo plan` for now)")
    if tp.batch_size % world_size:
        raise FlexoError(f"batch_size {tp.batch_size} must be divisible by the {world_size} DeepSpeed ranks")
    for section in ("bf16", "fp16"):
        if cfg.get(section, {}).get("enabled") in (True, "auto"):
            raise FlexoError(
                f"DeepSpeed config {path}: {section}.enabled must be false: it casts the model's weights, "
                "which moves the frozen public parts; flexo uses fp32 weights with torch_autocast instead"
            )
    fill = {
        ("train_batch_size",): tp.batch_size,
        ("train_micro_batch_size_per_gpu",): tp.batch_size // world_size,
        ("gradient_clipping",): float(tp.grad_clip),
        ("optimizer", "params", "lr"): tp.lr,
        ("optimizer", "params", "weight_decay"): tp.weight_decay,
        ("torch_autocast", "enabled"): bool(tp.bf16),
    }
    for keys, value in fill.items():
        node = cfg
        for k in keys[:-1]:
            node = node.get(k, {})
        if node.get(keys[-1]) == "auto":
            node[keys[-1]] = value

    def no_auto(node, where):
        if node == "auto":
            raise FlexoError(f"DeepSpeed config {path}: {where} is \"auto\", which flexo does not fill: set a value")
        if isinstance(node, dict):
            for k, v in node.items():
                no_auto(v, f"{where}.{k}" if where else k)

    no_auto(cfg, "")
    return cfg


def build_engine(model, trainable, grad_masks, no_decay, tp):
    """Start torch.distributed if needed and wrap `model` in a ZeRO-2 engine training `trainable`.

    Returns (engine, named, mask_hook_handles, device); `named` is the parameters in optimizer order.
    """
    distributed_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if not torch.distributed.is_initialized():
        backend = "gloo" if accel.device_name() == "cpu" else None
        if backend == "gloo" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # One CPU rank reduces nothing: skip DeepSpeed's shared-memory allreduce op, whose JIT build (a C++
            # compile, 1-4 min on 2 cores) would otherwise run on every fresh machine before the first step.
            # (import_module: `import deepspeed.comm.torch as m` would bind the torch that deepspeed.comm re-exports)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    world = torch.distributed.get_world_size()
    device = torch.device(accel.current_device_name())
    for name, p in model.named_parameters():
        if p.requires_grad and name not in trainable:
            raise FlexoError(f"{name} requires grad but is not in `trainable`: freeze it first")
    groups, named = param_groups(trainable, grad_masks, no_decay, tp)
    handles = [
        trainable[name].register_hook(lambda g, m=mask.to(device): g * m) for name, mask in grad_masks.items()
    ]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config(tp, world))
    return engine, named, handles, device


# --------------------------------------------------------------------------------------- checkpoints
class ZeroAdamState:
    """ZeRO-2's AdamW state seen per parameter, in torch AdamW's `state_dict` layout, so that
    `flexo.training.save_checkpoint/load_checkpoint` write and read it in flexo's usual format."""

    def __init__(self, engine, named: dict[str, torch.nn.Parameter]):
        self.engine = engine
        self.named = named
        self.zero = engine.optimizer
        self.inner = self.zero.optimizer  # torch.optim.AdamW over one flat fp32 partition per group
        self.group_of = {id(p): i for i, ps in enumerate(self.zero.bit16_groups) for p in ps}
        self.index = {id(p): i for i, p in enumerate(named.values())}

    def _flat(self, group: int) -> torch.Tensor:
        return self.zero.single_partition_of_fp32_groups[group]

    def state_dict(self) -> dict:
        """Collective under several ranks (the moments are gathered): call it on every rank."""
        from deepspeed.utils import safe_get_full_optimizer_state

        state = {}
        for i, p in enumerate(self.named.values()):
            inner_state = self.inner.state.get(self._flat(self.group_of[id(p)]))
            if not inner_state:
                continue  # no optimizer step yet
            s = {k: safe_get_full_optimizer_state(p, k).detach().to("cpu", torch.float32) for k in MOMENTS}
            s["step"] = torch.as_tensor(inner_state["step"]).detach().to("cpu", torch.float32).clone()
            state[i] = s
        groups = []
        for g, flat_group in zip(self.zero.optimizer.param_groups, self.zero.bit16_groups):
            hyper = {k: v for k, v in g.items() if k != "params" and _jsonable(v)}
            groups.append({**hyper, "params": [self.index[id(p)] for p in flat_group]})
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Called after the checkpoint's weights were copied into the model parameters: make them the
        fp32 master weights too, then write the moments and step back into the flat partitions."""
        from deepspeed.utils import safe_set_full_fp32_param

        for p in self.named.values():
            safe_set_full_fp32_param(p, p.detach())
        states = {int(k): v for k, v in sd["state"].items()}
        for g, params in enumerate(self.zero.bit16_groups):
            flat = self._flat(g)
            new = {k: torch.zeros_like(flat) for k in MOMENTS}
            step = None
            for p in params:
                s = states.get(self.index[id(p)])
                mapping = getattr(p, "_hp_mapping", None)
                if s is None:
                    raise FlexoError("checkpoint lacks optimizer state for a trainable parameter: rerun with --no-resume")
                step = s["step"]
                if mapping is None:
                    continue  # this rank holds no fragment of p
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                for k in MOMENTS:
                    src = s[k].to(flat.device, flat.dtype).reshape(-1).narrow(0, lp.start, lp.numel)
                    new[k].narrow(0, hp.start, hp.numel).copy_(src)
            if step is not None:
                new["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
                self.inner.state[flat] = new
        # re-point each parameter's optimizer-state fragments at the new tensors
        self.zero._hp_optimizer_states_linked = False
        self.zero._lazy_init_hp_params_optimizer_state()


class _Snapshot:
    def __init__(self, sd):
        self.sd = sd

    def state_dict(self):
        return self.sd


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


# ------------------------------------------------------------------------------------------- training
@torch.no_grad()
def _mean_over_ranks(value: float, device: torch.device) -> float:
    if torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t) / torch.distributed.get_world_size()


def train_deepspeed(model: torch.nn.Module, batches: Batches, val_blocks: torch.Tensor, tp: TrainParams, *,
                    trainable: dict[str, torch.nn.Parameter], grad_masks: dict[str, torch.Tensor] | None = None,
                    no_decay: set[str] = frozenset(), ckpt_dir: Path, key_parts: dict, resume: bool = True,
                    desc: str = "train", on_step: Callable[[int], None] | None = None) -> TrainResult:
    """`flexo.training.train` (same arguments) under a DeepSpeed ZeRO-2 engine (see the module docstring).

    On return the model is back on the device it came from, with ordinary (unflattened) parameters and
    without the engine's or the masks' gradient hooks.
    """
    set_threads()
    torch.manual_seed(tp.seed)
    grad_masks = grad_masks or {}
    home = next(model.parameters()).device
    engine, named, handles, device = build_engine(model, trainable, grad_masks, no_decay, tp)
    try:
        return _loop(engine, named, device, batches, val_blocks, tp, ckpt_dir, key_parts, resume, desc, on_step)
    finally:
        engine.destroy()
        for h in handles:
            h.remove()
        with torch.no_grad():
            for p in named.values():  # views into ZeRO's flat buffer -> standalone tensors
                p.data = p.data.detach().to(home).clone()
            model.to(home)


def _loop(engine, named, device, batches, val_blocks, tp, ckpt_dir, key_parts, resume, desc, on_step):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    micro = tp.batch_size // world
    module = engine.module
    opt_state = ZeroAdamState(engine, named)

    total = batches.total_steps(tp)
    key = run_key({**key_parts, "train": asdict(tp), "total": total})
    start, history, initial_val = begin_run(ckpt_dir, key, named, opt_state, resume=resume, desc=desc,
                                            initial_val=lambda: val_loss(module, val_blocks, tp, device=device))

    engine.train()
    seq = batches.blocks.shape[1]
    started, tokens_run = time.time(), 0
    train_losses: list[float] = []
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", mininterval=2.0, disable=rank != 0)
    for step in range(start, total):
        lr = lr_at(step, total, tp)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr
        x = batches.batch(step)[rank * micro : (rank + 1) * micro].to(device)
        loss = engine(input_ids=x, labels=x).loss
        if not torch.isfinite(loss.detach()):
            raise FlexoError(f"{desc}: loss became {float(loss)} at step {step}: lower the lr (now {tp.lr})")
        engine.backward(loss)
        engine.step()
        train_losses.append(_mean_over_ranks(loss.item(), device))
        tokens_run += micro * world * seq
        bar.update()
        bar.set_postfix(loss=f"{train_losses[-1]:.3f}")
        done = step + 1
        if done % tp.eval_every == 0 or done == total:
            history.append(log_row(done, done * batches.batch_size * seq, lr, train_losses, tp,
                                   val_loss(module, val_blocks, tp, device=device)))
        if done % tp.checkpoint_every == 0 and done < total:
            snapshot = _Snapshot(opt_state.state_dict())  # collective: every rank
            if rank == 0:
                weights = {n: p.detach().to("cpu") for n, p in named.items()}
                save_checkpoint(ckpt_dir, key, done, weights, snapshot, history)
            if world > 1:
                torch.distributed.barrier()
        if on_step:  # on every rank, so that a callback that stops the run stops all of them
            on_step(done)
    bar.close()
    return finish_run(history, steps=total, tokens=total * batches.batch_size * seq, initial_val=initial_val,
                      wall=time.time() - started, tokens_run=tokens_run, start=start)
