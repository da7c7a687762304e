"""FlexOlmo models as stock transformers objects, and the artifacts flexo passes between stages.

Every model flexo writes is a plain `FlexOlmoForCausalLM` folder (loads with
`AutoModelForCausalLM.from_pretrained`, no custom code) plus a `flexo.json` manifest. An owner ships an
**expert package**: `expert.safetensors` (its FFN and router row of every layer, nothing else) and
`expert.json` (owner, public fingerprint, shapes, training figures) — never data.
"""

from __future__ import annotations

import hashlib
import logging

from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, FlexOlmoConfig, FlexOlmoForCausalLM

from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, read_json, write_json
from flexo.params import OWNER_NAME, PUBLIC, ModelParams

log = logging.getLogger(__name__)

META = "flexo.json"
# Files a served model needs besides its weights and config (copied verbatim when present).
SUPPORT_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# Every file flexo writes into a model folder (globs): a folder holding anything else is not replaced.
MODEL_FILES = ("config.json", META, "README.md", "loss.csv", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "router_stats.safetensors", "router_refits.safetensors", *SUPPORT_FILES)


# --------------------------------------------------------------------------------------------- configs
def model_config(m: ModelParams, *, vocab_size: int, pad_id: int, eos_id: int, num_experts: int = 1,
                 top_k: int = 1) -> FlexOlmoConfig:
    """An OLMo-2 style FlexOlmo config (post-norm, QK-norm, RoPE, RMSNorm, no biases)."""
    check_top_k(top_k, num_experts)
    return FlexOlmoConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads,
        max_position_embeddings=max(4096, m.max_seq_len),
        rms_norm_eps=m.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=False,  # FlexOlmo: softmax over all experts, keep top-k, no renormalisation
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        tie_word_embeddings=False,
        output_router_logits=False,
    )


def check_top_k(top_k: int, num_experts: int) -> None:
    # transformers does not validate this; forward would fail later with "selected index k out of range".
    if not 1 <= top_k <= num_experts:
        raise FlexoError(f"top-k {top_k} is out of range: it must be between 1 and the {num_experts} experts")


def effective_top_k(requested: int, num_experts: int, what: str) -> int:
    """The one rule of merge and opt-out when fewer experts remain than top-k asks for: clamp to the
    experts there are, and say so (the released FlexOlmo RT model runs 7 of 7: withdrawing an owner must
    not make its next merge fail)."""
    if requested < 1:
        raise FlexoError(f"top-k {requested} is out of range: it must be at least 1")
    if requested > num_experts:
        log.warning("%s: top-k %d > %d experts: using top-%d (recorded in flexo.json as top_k, with top_k_requested)",
                    what, requested, num_experts, num_experts)
    return min(requested, num_experts)


def with_experts(config: FlexOlmoConfig, num_experts: int, top_k: int) -> FlexOlmoConfig:
    check_top_k(top_k, num_experts)
    new = FlexOlmoConfig.from_dict(config.to_dict())
    new.num_experts = num_experts
    new.num_experts_per_tok = top_k
    return new


def new_model(config: FlexOlmoConfig) -> FlexOlmoForCausalLM:
    # Eager experts: the grouped_mm default is ~1.6x slower on CPU for few experts (ENV.md).
    config._experts_implementation = "eager"
    return FlexOlmoForCausalLM(config)


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_config(path: Path, *, flex_olmo: bool = True):
    """A model folder's config.json as a transformers config; anything wrong with it is one line.

    transformers raises many exception types for a bad config (a strict-dataclass validation error for a
    wrong type, TypeError for a list, OSError for bad JSON), so every one of them is caught here."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FlexoError(f"{path} is not a model folder (no config.json): run the stage that writes it first")
    read_json(path / "config.json", what="model config")  # not JSON / not an object: one clear line first
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 — see the docstring
        raise FlexoError(f"{path}/config.json is not a valid model config ({_reason(e)}): rerun the stage that "
                         "wrote it") from None
    if flex_olmo and config.model_type != "flex_olmo":
        raise FlexoError(f"{path} holds a {config.model_type!r} model, not flex_olmo: convert it with train-public")
    return config


def load_tokenizer_from(path: Path, *, fix: str = "rerun the stage that wrote it"):
    """The tokenizer saved in `path` (a model or tokenizer folder); a broken one is one line."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 — tokenizers raise JSON, key, attribute and OS errors alike
        raise FlexoError(f"the tokenizer in {path} cannot be loaded ({_reason(e)}): {fix}") from None


def load_model(path: Path, *, dtype: torch.dtype = torch.float32) -> FlexOlmoForCausalLM:
    """Load a flexo model folder (stock transformers; never `trust_remote_code`, safetensors only)."""
    path = Path(path)
    load_config(path)
    try:
        model = FlexOlmoForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, experts_implementation="eager"
        )
    except Exception as e:  # noqa: BLE001 — weights that do not fit the config raise RuntimeError, etc.
        raise FlexoError(f"cannot load the model in {path} ({_reason(e)}): rerun its stage") from None
    return model.eval()


# ------------------------------------------------------------------------------------------ manifests
# The keys of flexo.json that later stages read, and the JSON type each must have.
_META_TYPES = {"kind": str, "fingerprint": str, "experts": list, "opted_out": list, "excluded": list,
               "packages": dict, "training": dict, "top_k": int, "num_experts": int, "opt_out_guarantee": str}


def read_meta(model_dir: Path) -> dict:
    """A model folder's flexo.json, type-checked: `experts` a list of owner names with `public` first,
    and every key later stages read of the JSON type they expect (one line naming the key if not)."""
    path = Path(model_dir) / META
    meta = read_json(path, what="flexo manifest")
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise FlexoError(f"flexo manifest {path}: {key} must be a JSON {kind.__name__}, got {value!r}: rerun the "
                             "stage that wrote it")
    names = [*meta.get("experts", []), *meta.get("opted_out", []), *meta.get("excluded", [])]
    bad = [n for n in names if not isinstance(n, str) or not (n == PUBLIC or OWNER_NAME.fullmatch(n))]
    if bad or (meta.get("experts") and meta["experts"][0] != PUBLIC):
        raise FlexoError(f"flexo manifest {path}: experts must be owner names with 'public' first, got "
                         f"{meta.get('experts')!r}: rerun the stage that wrote it")
    return meta


def model_kind(model_dir: Path) -> str | None:
    """The `kind` in a folder's flexo.json (public, owner, merged, merged-rt), or None without one."""
    try:
        kind = read_meta(model_dir).get("kind")
    except FlexoError:
        return None
    return kind if isinstance(kind, str) else None


def model_guard(kind: str, what: str, command: str, inputs: Iterable[Path] = ()) -> OutputGuard:
    """A stage's model folder may replace only an earlier model folder of the same kind."""
    return OutputGuard(what, lambda path: model_kind(path) == kind, tuple(inputs), command=command, files=MODEL_FILES)


def write_meta(model_dir: Path, meta: dict) -> None:
    write_json(Path(model_dir) / META, meta)


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FlexoError(f"{model_dir} holds no .safetensors weights: rerun the stage that writes it")
    return files


def fingerprint(model_dir: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order, streamed one tensor at a time.

    Independent of sharding and of file-level metadata, so the same weights always give the same value.
    """
    h = hashlib.sha256()
    entries = []
    f = model_dir
    try:
        for f in safetensors_files(model_dir):
            with safe_open(f, framework="pt") as st:
                entries += [(k, f) for k in st.keys()]
        for key, f in sorted(entries):
            with safe_open(f, framework="pt") as st:
                t = st.get_tensor(key).contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # corrupt or truncated weights
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlexoError(f"{f} is not a readable safetensors file ({reason}): rerun the stage that writes it") from None
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- router rows
def read_router_row(path: Path, hidden_size: int) -> torch.Tensor:
    """A router embedding written by `flexo embed` (already projected and scaled to the model width)."""
    path = Path(path)
    if not path.is_file():
        name = path.stem
        raise FlexoError(f"no router embedding for {name!r} ({path}): run `flexo embed --owner {name}` first")
    try:
        row = load_file(path)["router_row"]
    except (SafetensorError, KeyError, OSError) as e:
        raise FlexoError(f"router embedding {path} is unreadable ({e}): rerun `flexo embed`") from None
    if row.shape != (hidden_size,):
        raise FlexoError(
            f"router embedding {path} has shape {tuple(row.shape)} but the model width is {hidden_size}: "
            "rerun `flexo embed` after changing model.hidden_size"
        )
    return row.float()


# ------------------------------------------------------------------------------------ coupled models
@torch.no_grad()
def coupled_model(public: FlexOlmoForCausalLM, owner_row: torch.Tensor) -> FlexOlmoForCausalLM:
    """The owner's 2-expert model: expert 0 = the public FFN, expert 1 = a copy of it, router rows
    [r_pub, r_owner] in every layer, top-2 of 2 (a soft gate over both)."""
    if public.config.num_experts != 1:
        raise FlexoError(f"the public model must have 1 expert, it has {public.config.num_experts}")
    model = new_model(with_experts(public.config, 2, 2))
    src = public.state_dict()
    dst = model.state_dict()
    for key, value in dst.items():
        s = src[key]
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            value.copy_(torch.cat([s, s], dim=0))
        elif key.endswith("mlp.gate.weight"):
            value.copy_(torch.cat([s, owner_row.to(s.dtype)[None]], dim=0))
        else:
            value.copy_(s)
    return model


def owner_model_from_package(public_dir: Path, package_dir: Path) -> FlexOlmoForCausalLM:
    """An owner's 2-expert model rebuilt from the public model and its expert package: the weights the owner
    trained, exactly — its frozen parts were checked bit-identical to the public model after training, and
    expert 1's FFN and router row of every layer are the package. Lets a machine that holds only the
    package (the centre) score the owner's own model and BTM."""
    from safetensors.torch import load_file

    from flexo.package import ExpertPackage

    package = ExpertPackage.read(package_dir)
    public_meta = read_meta(public_dir)
    if package.public_fingerprint != public_meta.get("fingerprint"):
        raise FlexoError(f"{package.where} was trained against another public model than {public_dir}: "
                         f"retrain it with `flexo train-expert --owner {package.owner}`")
    package.verify()
    public = load_model(public_dir)
    tensors = load_file(str(package.tensors))
    model = coupled_model(public, tensors["layers.0.router"])
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            gate_up = torch.cat([tensors[f"layers.{i}.gate_proj"], tensors[f"layers.{i}.up_proj"]])
            layer.mlp.experts.gate_up_proj[1].copy_(gate_up)
            layer.mlp.experts.down_proj[1].copy_(tensors[f"layers.{i}.down_proj"])
            layer.mlp.gate.weight[1].copy_(tensors[f"layers.{i}.router"])
    return model.eval()


# ----------------------------------------------------------------------------------- expert packages
def expert_tensors(model: FlexOlmoForCausalLM, index: int) -> dict[str, torch.Tensor]:
    """Expert `index`'s FFN and router row of every layer, in package form (per-expert, unfused)."""
    out = {}
    inter = model.config.intermediate_size
    for i, layer in enumerate(model.model.layers):
        gu = layer.mlp.experts.gate_up_proj[index]
        out[f"layers.{i}.gate_proj"] = gu[:inter].detach().clone().contiguous()  # gate rows first, then up
        out[f"layers.{i}.up_proj"] = gu[inter:].detach().clone().contiguous()
        out[f"layers.{i}.down_proj"] = layer.mlp.experts.down_proj[index].detach().clone().contiguous()
        out[f"layers.{i}.router"] = layer.mlp.gate.weight[index].detach().clone().contiguous()
    return out


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
