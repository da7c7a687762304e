"""FlexOlmo models as stock transformers objects, and the artifacts flexo passes between stages.

Every model flexo writes is a plain `FlexOlmoForCausalLM` folder (loads with
`AutoModelForCausalLM.from_pretrained`, no custom code) plus a `flexo.json` manifest. An owner ships an
**expert package**: `expert.safetensors` (its FFN and router row of every layer, nothing else) and
`expert.json` (owner, public fingerprint, shapes, training figures) — never data.
"""

from __future__ import annotations

import logging

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, FlexOlmoConfig, FlexOlmoForCausalLM

from flexo.errors import FlexoError
from flexo.fsutil import read_json
# The torch-free half of a model folder (manifest, file names, top-k rule, weights as bytes), re-exported.
from flexo.model_files import (  # noqa: F401
    META, MODEL_FILES, SUPPORT_FILES, check_top_k, effective_top_k, model_guard, model_kind, read_meta,
    safetensors_files, write_meta,
)
from flexo.params import ModelParams
from flexo.weights import fingerprint  # noqa: F401

log = logging.getLogger(__name__)

# safetensors' float dtype names → torch's (a converted checkpoint keeps its dtype: flexo/checkpoint.py).
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}



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
