"""`flexo plan`: before anything runs, what each stage of a params file needs on GPUs (memory per GPU, CPU
memory, disk, time) and whether it fits.

    make_plan(params, Hardware(gpus=8, gpu_mem_gb=80), params_file) -> Plan     format_plan(plan) -> str

Everything is computed from the params (architecture, batch sizes, data budgets, the DeepSpeed config each
training stage names); nothing is loaded or run. The figures and where they come from:

- Parameters: counted from the shapes of transformers' FlexOlmo (OLMo-2 layers: q/k/v/o projections,
  QK-norm, two post-norms, an untied LM head; E fused SwiGLU experts and an E-row router per layer). The
  vocabulary is `model.init_from`'s config.json `vocab_size` when that folder is there, else
  `tokenizer.vocab_size`.
- Model states per GPU (weights, gradients, AdamW moments): DeepSpeed's own estimators
  (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`) applied to the
  trainable parameters, plus two corrections for how flexo trains (fp32 weights under bf16 autocast,
  flexo/ds_backend.py): the estimators assume every parameter is trainable, so the frozen parameters are
  added as flexo holds them, fp32 weights and nothing else (4 B each; ÷ GPUs under ZeRO-3; on the CPU with
  ZeRO-3 parameter offload); and they assume 16-bit weights where flexo keeps fp32 ones: 2 B more per
  trainable weight held on the GPU.
- train_expert's trainable parameters are what its optimizer holds: the fused expert tensors of both
  experts and both router rows of every layer (expert 0 and r_pub get a zero gradient through a mask,
  stages/train_expert.py `owner_trainables`), i.e. twice the owner's own expert.
- Activations per GPU: Korthikanti et al. 2022 (arXiv 2205.05198), 16-bit values, no recomputation:
  34·s·b·h bytes per layer, its MLP share (19·s·b·h) counted once per active expert. No 5·a·s²·b
  attention-score term: FlexOlmo's attention runs through torch SDPA, whose GPU kernels keep no s×s scores.
  Plus the logits, b·s·V·(2+4) bytes (bf16, then fp32 for the loss). b = micro-batch per GPU.
- evaluate: flexo.evaluation holds each model in fp32, without autocast, on one GPU: the merged model's
  weights (4 B each), one layer's activations and the logits, all in fp32.
- Time: tokens ÷ (tokens/s per GPU × GPUs), tokens/s per GPU = MFU × peak FLOP/s ÷ (6·N_active) for
  training (2·N_active for inference); N_active = the weights one token multiplies with (the top_k
  experts and the LM head, not the input embedding). Train tokens are estimated from the character
  budgets, curate.*_train_chars ÷ 4 characters per token, × epochs.
- Disk: weights in fp32, the dtype flexo trains and writes (OLMo-2's released checkpoints are fp32 too); a
  resumable checkpoint is the trainable weights and AdamW's two moments in fp32 (12 B per trainable
  parameter, flexo/training.py `save_checkpoint`), held twice while a new one replaces the last.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flexo.errors import FlexoError
from flexo.params import Params, TrainParams

GB = 1e9  # --gpu-mem and every printed size are in GB = 10^9 bytes
WEIGHT_BYTES = 4  # fp32
CHECKPOINT_BYTES = 12  # per trainable parameter: fp32 weight + AdamW's two fp32 moments
CHARS_PER_TOKEN = 4  # for the token budget estimated from curate.*_train_chars
MFU = 0.40  # model FLOPs utilisation assumed when no --tokens-per-s-per-gpu is given
H100_BF16_FLOPS = 989e12  # dense bf16 peak FLOP/s of an H100 SXM
DISK_BYTES_PER_S = 1e9  # read + write rate assumed for the I/O-bound stages (conversion, merge)
ACTIVATION_PER_SBH = 34  # Korthikanti et al.: bytes per layer per (sequence position × sample × hidden)
MLP_PER_SBH = 19  # the MLP's share of it, repeated for every further active expert
ZERO3_CONFIGS = ("configs/deepspeed_zero3.json", "configs/deepspeed_zero3_offload.json")
NOT_RUNNABLE = "planned, not runnable by flexo's backend yet (it runs ZeRO stage <= 2)"


# ------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Shape:
    """The FlexOlmo architecture of `params.model`, as parameter counts and activation bytes."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int

    @property
    def expert(self) -> int:
        """One expert's FFN parameters (gate, up, down) over all layers."""
        return 3 * self.hidden * self.ffn * self.layers

    def params(self, experts: int) -> int:
        h = self.hidden
        layer = 4 * h * h + 4 * h + experts * (3 * h * self.ffn + h)  # attention, 4 norms, experts + router rows
        return 2 * self.vocab * h + self.layers * layer + h  # embedding, untied LM head, final norm

    def active(self, experts: int, top_k: int) -> int:
        """The weights one token multiplies with: all but the input embedding and the unselected experts."""
        return self.params(experts) - self.vocab * self.hidden - (experts - top_k) * self.expert

    def largest_module(self, experts: int) -> int:
        """Parameters of the largest module (what ZeRO-3 gathers at once): the embedding or one layer's experts."""
        return max(self.vocab * self.hidden, experts * 3 * self.hidden * self.ffn)

    def activation_bytes(self, seq: int, micro: int, top_k: int, *, layers: int, value_bytes: int = 2) -> int:
        """Activations of `layers` layers (Korthikanti's counts are for 2-byte values) plus the logits."""
        per_layer = seq * micro * self.hidden * (ACTIVATION_PER_SBH + MLP_PER_SBH * (top_k - 1)) * value_bytes // 2
        logits = micro * seq * self.vocab * (value_bytes + 4)
        return layers * per_layer + logits


def model_shape(params: Params) -> tuple[Shape, str]:
    """The shape and where its vocabulary size came from."""
    vocab, source = params.tokenizer.vocab_size, "tokenizer.vocab_size"
    config = Path(params.model.init_from) / "config.json" if params.model.init_from else None
    if config is not None and config.is_file():
        try:
            vocab, source = int(json.loads(config.read_text())["vocab_size"]), str(config)
        except (OSError, ValueError, KeyError, TypeError):
            raise FlexoError(f"plan: {config} has no readable vocab_size: check model.init_from") from None
    m = params.model
    return Shape(vocab, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size), source


# ---------------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Hardware:
    gpus: int = 1  # GPUs of one node
    gpu_mem_gb: float = 80.0
    gpu_flops: float = H100_BF16_FLOPS
    tokens_per_s_per_gpu: float | None = None  # a measured training throughput; None = from MFU

    def __post_init__(self):
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise FlexoError(f"plan: --gpus must be a whole number of at least 1, got {self.gpus!r}")
        for flag, value in (("--gpu-mem", self.gpu_mem_gb), ("--gpu-flops", self.gpu_flops),
                            ("--tokens-per-s-per-gpu", self.tokens_per_s_per_gpu)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise FlexoError(f"plan: {flag} must be a positive number, got {value!r}")

    @property
    def gpu_mem(self) -> float:
        return self.gpu_mem_gb * GB

    def tokens_per_s(self, active: int, *, training: bool = True) -> float:
        """Per GPU: the measured figure for training, else MFU × peak ÷ FLOPs per token (6·N or 2·N)."""
        if training and self.tokens_per_s_per_gpu:
            return self.tokens_per_s_per_gpu
        return MFU * self.gpu_flops / ((6 if training else 2) * active)


# ------------------------------------------------------------------------------------- model states
@dataclass(frozen=True)
class Zero:
    """What the planner needs of a DeepSpeed config: its ZeRO stage and what it offloads to the CPU."""

    config: str
    stage: int
    offload_optimizer: bool
    offload_params: bool

    @classmethod
    def of(cls, tp: TrainParams, path: str | None = None) -> Zero:
        from flexo.ds_backend import PROJECT_ROOT, config_path, read_config, zero_stage

        where = config_path(tp, PROJECT_ROOT / path if path else None)
        cfg = read_config(where)
        z = cfg.get("zero_optimization", {})
        shown = where.relative_to(PROJECT_ROOT) if where.is_relative_to(PROJECT_ROOT) else where

        def offloaded(key: str) -> bool:
            return (z.get(key) or {}).get("device", "none") != "none"

        return cls(str(shown), zero_stage(cfg, where), offloaded("offload_optimizer"), offloaded("offload_param"))

    @property
    def runnable(self) -> bool:
        from flexo.ds_backend import MAX_ZERO_STAGE

        return self.stage <= MAX_ZERO_STAGE

    @property
    def label(self) -> str:
        offload = [what for what, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        return f"ZeRO-{self.stage}" + (f", {' + '.join(offload)} offloaded to CPU" if offload else "")


def model_states(trainable: int, frozen: int, largest_module: int, zero: Zero, gpus: int) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) of weights, gradients and AdamW moments on one node of
    `gpus` GPUs: DeepSpeed's estimator for the `trainable` parameters (it takes every parameter as
    trainable and 16-bit on the GPU), plus flexo's fp32 weights: 2 B more per trainable weight and 4 B per
    frozen one, wherever ZeRO keeps the weights (every GPU under ZeRO-2; 1/gpus of them under ZeRO-3; the
    CPU under ZeRO-3 parameter offload)."""
    if zero.stage not in (2, 3):
        raise FlexoError(f"plan: {zero.config} has ZeRO stage {zero.stage}: flexo plan estimates stages 2 and 3 "
                         "(DeepSpeed's estimators); use configs/deepspeed_zero2.json")
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        raise FlexoError("plan: flexo plan uses DeepSpeed's memory estimators, and DeepSpeed is not installed: "
                         "`pip install -e '.[gpu]'`") from None
    if zero.stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=gpus, num_nodes=1,
                                                         cpu_offload=zero.offload_optimizer)
        gpu_share, cpu_share = 1.0, 0.0
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, largest_module, num_gpus_per_node=gpus,
                                                            num_nodes=1, cpu_offload=zero.offload_optimizer,
                                                            cpu_offload_params=zero.offload_params)
        gpu_share, cpu_share = (0.0, 1.0) if zero.offload_params else (1 / gpus, 0.0)
    fp32_extra = 2 * trainable + WEIGHT_BYTES * frozen
    return int(gpu + fp32_extra * gpu_share), int(cpu + fp32_extra * cpu_share)


@dataclass(frozen=True)
class Memory:
    states: int  # per GPU
    activations: int  # per GPU
    cpu: int  # per node

    @property
    def gpu(self) -> int:
        return self.states + self.activations


@dataclass(frozen=True)
class Training:
    """One training stage's run, as far as its memory goes."""

    stage: str  # the params section: train_public or train_expert
    tp: TrainParams
    shape: Shape
    experts: int
    top_k: int
    trainable: int
    seq: int
    kept_on_cpu: int = 0  # bytes each rank holds on the CPU besides the model it trains

    @property
    def frozen(self) -> int:
        return self.shape.params(self.experts) - self.trainable

    def micro_batch(self, gpus: int, batch_size: int | None = None) -> int:
        batch_size = batch_size or self.tp.batch_size
        if batch_size % gpus:
            raise FlexoError(f"plan: {self.stage}.batch_size ({batch_size}) must be divisible by --gpus ({gpus}): "
                             "every GPU takes an equal share of each batch")
        return batch_size // gpus

    def memory(self, zero: Zero, gpus: int, batch_size: int | None = None) -> Memory:
        states, cpu = model_states(self.trainable, self.frozen, self.shape.largest_module(self.experts), zero, gpus)
        activations = self.shape.activation_bytes(self.seq, self.micro_batch(gpus, batch_size), self.top_k,
                                                  layers=self.shape.layers)
        # every rank builds its model on the CPU (DeepSpeed's CPU estimate covers the trainable part)
        built = gpus * (WEIGHT_BYTES * self.frozen + self.kept_on_cpu)
        return Memory(states, activations, cpu + built)

    def fixes(self, zero: Zero, hw: Hardware) -> list[str]:
        """Single changes that would make this stage fit: more GPUs, a smaller batch, a ZeRO-3 config."""
        def fits(z: Zero, gpus: int, batch: int) -> bool:
            return self.memory(z, gpus, batch).gpu <= hw.gpu_mem

        batch, found = self.tp.batch_size, []
        more = [g for g in (hw.gpus * 2, hw.gpus * 4, hw.gpus * 8) if batch % g == 0 and fits(zero, g, batch)]
        if more:
            found.append(f"raise --gpus to {more[0]}")
        smaller = [b for b in range(batch - hw.gpus, 0, -hw.gpus) if fits(zero, hw.gpus, b)]
        if smaller:
            found.append(f"lower {self.stage}.batch_size ({batch}) to {smaller[0]}")
        for path in ZERO3_CONFIGS:
            other = Zero.of(self.tp, path)
            if other != zero and fits(other, hw.gpus, batch):
                found.append(f"set {self.stage}.deepspeed_config: {path} (ZeRO-3: flexo's backend does not run it yet)")
                break
        return found


# ------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    stage: str
    what: str
    gpu: int  # bytes per GPU; 0 = the stage uses no GPU
    cpu: int | None  # bytes per node; None = not planned
    disk: int  # bytes the stage writes (peak while it runs)
    seconds: float
    details: list[str] = field(default_factory=list)
    runnable: bool = True  # False: planned with a config flexo's backend does not run yet
    fixes: list[str] = field(default_factory=list)  # filled when it does not fit


def gpus(hw: Hardware) -> str:
    return f"{hw.gpus} GPU" + "s" * (hw.gpus > 1)


def either(options: list[str]) -> str:
    return ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else "".join(options)


def size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def duration(seconds: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.1f} {unit}"
    return f"{seconds:.0f} s" if seconds >= 1 else "< 1 s"


def billions(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


def count(n: float) -> str:
    return billions(n) if n >= 1e6 else f"{n / 1e3:.0f} k"


def train_tokens(tp: TrainParams, chars: int, seq: int, own_share: float = 1.0) -> int:
    """Tokens a training stage processes: epochs over its text (chars ÷ 4) ÷ the own-text share of a
    batch, or max_steps full batches when that cap is lower."""
    tokens = tp.epochs * chars / CHARS_PER_TOKEN / own_share
    return int(min(tokens, tp.max_steps * tp.batch_size * seq) if tp.max_steps else tokens)


def training_row(t: Training, zero: Zero, hw: Hardware, tokens: int, what: str, disk: dict[str, int]) -> Row:
    mem = t.memory(zero, hw.gpus)
    tps = hw.tokens_per_s(t.shape.active(t.experts, t.top_k))
    details = [
        f"{billions(t.shape.params(t.experts))} params: trainable {billions(t.trainable)}"
        + (f", frozen {billions(t.frozen)} (fp32 weights only)" if t.frozen else ""),
        f"GPU: model states {size(mem.states)} ({zero.label}, {zero.config}) + activations "
        f"{size(mem.activations)} (micro-batch {t.micro_batch(hw.gpus)} x {t.seq} tokens)",
        f"CPU: DeepSpeed's estimate for the trainable + each rank's frozen weights{' and public model' if t.kept_on_cpu else ''} "
        "as flexo builds them",
        f"time: {count(tokens)} tokens at {tps:,.0f} tokens/s per GPU",
        "disk: " + " + ".join(f"{name} {size(n)}" for name, n in disk.items()),
    ]
    if t.tp.backend == "torch":
        details.append(f"{t.stage}.backend is torch: that trains on the CPU; this plan is for backend auto/deepspeed")
    row = Row(t.stage, what, mem.gpu, mem.cpu, sum(disk.values()), tokens / (tps * hw.gpus), details, zero.runnable)
    if not zero.runnable:
        row.details.append(f"{zero.config}: {NOT_RUNNABLE}")
    if row.gpu > hw.gpu_mem:
        row.fixes = t.fixes(zero, hw)
    return row


def public_row(params: Params, shape: Shape, hw: Hardware) -> Row:
    weights = WEIGHT_BYTES * shape.params(1)
    if params.model.init_from:  # flexo/checkpoint.py streams the checkpoint, one tensor in memory at a time
        return Row("train_public", f"converted from {params.model.init_from}, no training", 0,
                   WEIGHT_BYTES * shape.largest_module(1), weights, 2 * weights / DISK_BYTES_PER_S,
                   [f"{billions(shape.params(1))} params; I/O bound: read + write at {size(DISK_BYTES_PER_S)}/s"])
    tp, seq = params.train_public, params.model.max_seq_len
    t = Training("train_public", tp, shape, experts=1, top_k=1, trainable=shape.params(1), seq=seq)
    disk = {"models/public": weights, "checkpoints (2 at peak)": 2 * CHECKPOINT_BYTES * t.trainable}
    return training_row(t, Zero.of(tp), hw, train_tokens(tp, params.curate.public_train_chars, seq),
                        "public model, all weights trainable", disk)


def expert_training(params: Params, shape: Shape) -> Training:
    """An owner's expert training as the planner sees it (also what bench/gpu_train.py compares its peak
    memory with)."""
    # the optimizer holds the fused tensors of both experts and both router rows (expert 0 masked)
    # the public model stays on each rank's CPU for the bit-identity check after training
    return Training("train_expert", params.train_expert, shape, experts=2, top_k=2, seq=params.model.max_seq_len,
                    kept_on_cpu=WEIGHT_BYTES * shape.params(1), trainable=2 * (shape.expert + shape.hidden * shape.layers))


def expert_row(params: Params, shape: Shape, hw: Hardware) -> Row:
    tp, seq = params.train_expert, params.model.max_seq_len
    t = expert_training(params, shape)
    public_rows = min(tp.batch_size - 1, round(tp.batch_size * tp.public_mix))  # as flexo.training.Batches
    own_share = (tp.batch_size - public_rows) / tp.batch_size
    disk = {"model/": WEIGHT_BYTES * shape.params(2),
            "expert package": WEIGHT_BYTES * (shape.expert + shape.hidden * shape.layers),
            "checkpoints (2 at peak)": 2 * CHECKPOINT_BYTES * t.trainable}
    row = training_row(t, Zero.of(tp), hw, train_tokens(tp, params.curate.owner_train_chars, seq, own_share),
                       f"per owner (x{len(params.owners)}): 2-expert model", disk)
    row.details.insert(1, "trainable = both experts' fused FFN tensors and router rows (expert 0 masked, but in the "
                          "optimizer): twice the owner's expert")
    dp = [o for o in params.owners if tp.dp.applies_to(o)]
    if dp:
        row.details.append(f"DP-SGD owners {dp} are planned as the others (flexo/dp.py's per-document gradients are not)")
    return row


def merged_experts(params: Params) -> tuple[int, int]:
    """(experts, top_k) of the merged model."""
    experts = 1 + len(params.owners)
    return experts, min(params.merge.top_k, experts)


def merge_rows(params: Params, shape: Shape) -> list[Row]:
    experts, _ = merged_experts(params)
    merged = WEIGHT_BYTES * shape.params(experts)
    layer = WEIGHT_BYTES * max(shape.vocab * shape.hidden, shape.params(experts) // shape.layers)
    merge = Row("merge", f"public + {experts - 1} expert packages -> {experts} experts", 0,
                params.merge.shard_bytes + layer, merged, 2 * merged / DISK_BYTES_PER_S,
                [f"{billions(shape.params(experts))} params; CPU: one shard (merge.shard_bytes) + one layer; "
                 f"I/O bound at {size(DISK_BYTES_PER_S)}/s"])
    tune = Row("router_tune", f"router rows only ({params.router_tune.method})", 0, None, merged, 0.0,
               ["disk: models/merged-rt, a copy of the merged model with new router rows; memory not planned"])
    return [merge, tune]


def evaluate_row(params: Params, shape: Shape, hw: Hardware) -> Row:
    experts, top_k = merged_experts(params)
    ev = params.evaluate
    # flexo.evaluation loads each model with load_model's float32, no autocast, on one GPU
    weights = WEIGHT_BYTES * shape.params(experts)

    def gpu_at(batch: int) -> int:  # forward passes keep one layer's activations and the logits, in fp32
        return weights + shape.activation_bytes(ev.max_length, batch, top_k, layers=1, value_bytes=4)

    merged, n = shape.active(experts, top_k), len(params.owners)
    passes = [shape.active(1, 1), merged] + ([merged] if params.router_tune.method != "none" else [])
    if ev.baselines:  # soup (dense), each owner's model (BTM's members), each opt-out of the merged model
        passes += [shape.active(1, 1)] + [shape.active(2, 2)] * n + [merged] * n
    tokens = (1 + n) * params.curate.max_eval_chars / CHARS_PER_TOKEN  # test splits at their cap
    seconds = sum(tokens / hw.tokens_per_s(active, training=False) for active in passes)
    row = Row("evaluate", f"{len(passes)} model passes over {1 + n} test splits, 1 GPU", gpu_at(ev.batch_size),
              weights, 0, seconds,
              [f"GPU: the merged model in fp32 {size(weights)} (as flexo.evaluation loads it) + activations "
               f"{size(gpu_at(ev.batch_size) - weights)} (one layer and the logits in fp32, batch {ev.batch_size} "
               f"x {ev.max_length})",
               f"time: {count(tokens)} tokens per pass (curate.max_eval_chars / 4 per split), "
               "2 x N_active FLOPs per token"])
    if row.gpu > hw.gpu_mem:
        smaller = [b for b in range(ev.batch_size - 1, 0, -1) if gpu_at(b) <= hw.gpu_mem]
        row.fixes = ([f"lower evaluate.batch_size ({ev.batch_size}) to {smaller[0]}"] if smaller else
                     [f"use GPUs of more than {size(weights)}: flexo evaluates the fp32 merged model on one GPU"])
    return row


# ------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    params_file: str
    hardware: Hardware
    model: str
    rows: list[Row]
    formulas: list[str]

    @property
    def misfits(self) -> list[Row]:
        return [r for r in self.rows if r.gpu > self.hardware.gpu_mem]

    def error(self) -> str | None:
        """The one-line refusal when a stage does not fit, naming it and what to change; None when all fit."""
        if not self.misfits:
            return None
        first, hw = self.misfits[0], self.hardware
        others = [r.stage for r in self.misfits[1:]]
        change = either(first.fixes) or "no single change planned here fits: use GPUs with more memory"
        also = f"; {', '.join(others)} does not fit either" if others else ""
        return f"plan: {first.stage} needs {first.gpu / GB:.1f} GB per GPU on {gpus(hw)} of {hw.gpu_mem_gb:g} GB: {change}{also}"

    def verdict(self) -> str:
        if self.misfits:
            text = "does not fit: " + self.error().removeprefix("plan: ")
        else:
            largest = max(self.rows, key=lambda r: r.gpu)
            text = (f"fits: every stage within {self.hardware.gpu_mem_gb:g} GB per GPU "
                    f"(largest: {largest.stage}, {largest.gpu / GB:.1f} GB)")
        waiting = [r.stage for r in self.rows if not r.runnable]
        return text + (f"; {', '.join(waiting)}: {NOT_RUNNABLE}" if waiting else "")

    def as_dict(self) -> dict:
        return {"params_file": self.params_file, "hardware": asdict(self.hardware), "model": self.model,
                "stages": [asdict(r) for r in self.rows], "formulas": self.formulas,
                "fits": not self.misfits, "verdict": self.verdict()}


def formulas(hw: Hardware) -> list[str]:
    if hw.tokens_per_s_per_gpu:
        throughput = f"{hw.tokens_per_s_per_gpu:,.0f} (--tokens-per-s-per-gpu)"
    else:
        throughput = f"{MFU:.0%} MFU x {hw.gpu_flops / 1e12:,.0f} TFLOP/s / (6 x N_active)"
    return [
        f"GB = 10^9 bytes; one node of {gpus(hw)}; N_active = the weights a token multiplies with (top_k experts, LM head)",
        "model states per GPU = DeepSpeed's estimate_zero{2,3}_model_states_mem_needs(trainable, GPUs)",
        "    + 2 B x trainable + 4 B x frozen weights held on the GPU (/ GPUs under ZeRO-3): flexo keeps fp32",
        "    weights, the estimators count 16-bit trainable ones only",
        "activations per GPU = layers x s*b*h*(34 + 19*(top_k - 1)) B + logits b*s*V*(2 + 4) B",
        "    (Korthikanti et al. 2022: bf16, no recomputation; SDPA attention keeps no s^2 scores),",
        "    b = batch_size / GPUs, s = model.max_seq_len",
        f"time = tokens / (tokens/s per GPU x GPUs); training tokens/s per GPU = {throughput};",
        f"    evaluation: {MFU:.0%} MFU at 2 x N_active FLOPs per token",
        f"train tokens = epochs x curate.*_train_chars / {CHARS_PER_TOKEN} chars per token (owners: / the own-text "
        "share of a batch, 1 - public_mix)",
        f"disk: fp32 weights; checkpoint = {CHECKPOINT_BYTES} B x trainable (weights + 2 AdamW moments), twice while "
        "one replaces the last",
    ]


def make_plan(params: Params, hw: Hardware, params_file: str = "params.yaml") -> Plan:
    shape, vocab_from = model_shape(params)
    model = (f"{shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, FFN {shape.ffn}, "
             f"vocab {shape.vocab} ({vocab_from}), seq {params.model.max_seq_len}; "
             f"{billions(shape.params(1))} params as the 1-expert public model")
    rows = [public_row(params, shape, hw), expert_row(params, shape, hw), *merge_rows(params, shape),
            evaluate_row(params, shape, hw)]
    return Plan(params_file, hw, model, rows, formulas(hw))


def format_plan(plan: Plan) -> str:
    hw = plan.hardware
    head = ("stage", "what", "GPU mem/GPU", "CPU mem", "disk", "time")
    table = [(r.stage, r.what, size(r.gpu) if r.gpu else "-", size(r.cpu) if r.cpu is not None else "-",
              size(r.disk) if r.disk else "-", duration(r.seconds) if r.seconds else "-") for r in plan.rows]
    widths = [max(len(line[i]) for line in [head, *table]) for i in range(len(head))]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [f"flexo plan: {plan.params_file} on {gpus(hw)} of {hw.gpu_mem_gb:g} GB", f"model: {plan.model}", "",
           line(head)]
    for row, cells in zip(plan.rows, table):
        out.append(line(cells))
        out += [" " * (widths[0] + 2) + d for d in row.details]
    out += ["", "formulas:"] + [f"  {f}" for f in plan.formulas] + ["", f"verdict: {plan.verdict()}"]
    return "\n".join(out)
