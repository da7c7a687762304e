"""Start from a real public model (`model.init_from`): a local transformers folder holding a dense OLMo-2
(`Olmo2ForCausalLM`) or a FlexOlmo model whose expert 0 is the public expert.

Three steps, each where the pipeline needs it:

* `read_source` (tokenizer and train-public stages): the folder's config and safetensors headers, checked
  against `params.yaml`'s `model` section: every mismatch is one line naming the key and the value to set.
* `source_tokenizer` (tokenizer stage): the checkpoint's own tokenizer, which becomes `models/tokenizer`, so
  curation's token counts, the owners' training and the evaluation all read text with the ids the weights
  were trained on. flexo's BPE is not trained at all then.
* `write_public_model` (train-public stage): flexo's 1-expert FlexOlmo written tensor by tensor, byte for byte
  in the checkpoint's dtype (flexo/weights.py streams: one tensor in memory at a time, nothing upcast).
  A dense OLMo-2 layer's `mlp.{gate,up,down}_proj` become expert 0's; a FlexOlmo's expert 0 is kept and its
  other experts and router are dropped; the single router row is r_pub (with one expert the gate is 1
  whatever the row, so the function is the checkpoint's, bit for bit).

Weights are read from safetensors only; no pickle, no `trust_remote_code`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from flexo.errors import FlexoError
from flexo.model_files import write_config_json
from flexo.params import Params
from flexo.weights import FFN_PARTS, ShardWriter, TensorSpec, WeightReader, shared_keys

SUPPORTED = {"olmo2": "a dense OLMo-2", "flex_olmo": "a FlexOlmo model"}
# params.yaml `model` key → the checkpoint's config key: these must agree (the embed stage, the planner and the
# router rows are sized from params.yaml; rope and eps decide the function, SPEC §1).
SAME = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
        "intermediate_size": "intermediate_size", "rms_norm_eps": "rms_norm_eps"}
# The config keys that carry over unchanged into the converted FlexOlmo config.
CARRIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
           "attention_bias", "attention_dropout", "pad_token_id", "eos_token_id", "bos_token_id", "dtype")


@dataclass
class Source:
    """A checked checkpoint folder: its config (a dict), model type, float dtype and headers."""

    path: Path
    config: dict
    model_type: str
    dtype: str
    reader: WeightReader = field(repr=False)

    @property
    def num_experts(self) -> int:
        return int(self.config.get("num_experts", 1)) if self.model_type == "flex_olmo" else 1


def _fail(path: Path, what: str) -> FlexoError:
    return FlexoError(f"model.init_from {path}: {what}")


def _rope_theta(config: dict) -> float | None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("rope_theta", config.get("rope_theta"))


def read_source(params: Params) -> Source:
    """`model.init_from` checked: a transformers folder of a supported type, safetensors weights of one float
    dtype, every tensor flexo needs, and the shapes, eps and rope of `params.yaml`'s `model` section."""
    path = Path(params.model.init_from)
    if not (path / "config.json").is_file():
        raise _fail(path, "not a transformers checkpoint folder (no config.json): download or export the model there")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"config.json is not readable JSON ({type(e).__name__}): re-download the checkpoint") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED:
        raise _fail(path, f"model_type {model_type!r} is not olmo2 or flex_olmo: flexo converts dense OLMo-2 and "
                          "FlexOlmo checkpoints only")
    if not any(path.glob("*.safetensors")):
        raise _fail(path, "holds no .safetensors weights (pickle checkpoints such as pytorch_model.bin are refused): "
                          "convert it to safetensors first")
    reader = WeightReader(path, f"model.init_from {path}").open()
    m = params.model
    for ours, theirs in SAME.items():
        if config.get(theirs) != getattr(m, ours):
            raise _fail(path, f"its {theirs} is {config.get(theirs)!r} but params.yaml has model.{ours}: "
                              f"{getattr(m, ours)!r}: set model.{ours}: {config.get(theirs)!r}")
    if _rope_theta(config) != m.rope_theta:
        raise _fail(path, f"its rope_theta is {_rope_theta(config)!r} but params.yaml has model.rope_theta: "
                          f"{m.rope_theta!r}: set model.rope_theta: {_rope_theta(config)!r}")
    if m.max_seq_len > int(config.get("max_position_embeddings", 0)):
        raise _fail(path, f"model.max_seq_len {m.max_seq_len} is beyond its max_position_embeddings "
                          f"{config.get('max_position_embeddings')}: lower model.max_seq_len")
    floats = {e.dtype for e in reader.entries.values() if e.dtype in ("F32", "BF16", "F16", "F64")}
    if len(floats) != 1:
        raise _fail(path, f"its weights mix dtypes {sorted(floats)}: flexo needs one dtype (save it with one)")
    source = Source(path, config, model_type, floats.pop(), reader)
    _check_tensors(source)
    return source


def _ffn_shapes(source: Source, layer: int, expert: int) -> list[tuple[int, ...]]:
    """Shapes of one layer's gate/up/down (expert `expert` of a FlexOlmo, per-expert or fused form)."""
    r, p = source.reader, f"model.layers.{layer}.mlp."
    try:
        if source.model_type == "olmo2":
            return [r.shape(f"{p}{part}.weight") for part in FFN_PARTS]
        return [spec.shape for spec in r.expert_ffn(layer, expert, source.config["intermediate_size"], "")]
    except FlexoError:
        raise _fail(source.path, f"layer {layer}: expert {expert}'s FFN tensors are missing: the checkpoint is "
                                 "incomplete; re-download it") from None


def _check_tensors(source: Source) -> None:
    cfg, r = source.config, source.reader
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        if key not in r:
            raise _fail(source.path, f"tensor {key} is missing: the checkpoint is incomplete; re-download it")
    if r.shape("model.embed_tokens.weight") != (vocab, hidden):
        raise _fail(source.path, f"model.embed_tokens.weight is {list(r.shape('model.embed_tokens.weight'))}, "
                                 f"not [vocab_size {vocab}, hidden_size {hidden}]: re-download it")
    want = [(inter, hidden), (inter, hidden), (hidden, inter)]
    for i in range(cfg["num_hidden_layers"]):
        shapes = _ffn_shapes(source, i, 0)
        if shapes != want:
            raise _fail(source.path, f"layer {i}'s FFN is {shapes}, not {want} from its config: re-download it")
        for e in range(1, source.num_experts):
            other = _ffn_shapes(source, i, e)
            if other != shapes:
                raise _fail(source.path, f"layer {i}: expert {e}'s FFN is {other}, expert 0's {shapes}: a FlexOlmo "
                                         "whose experts differ in shape cannot be converted")


def source_tokenizer(source: Source):
    """The checkpoint's own tokenizer (a fast tokenizer from its folder, nothing fetched), checked against
    its embedding. A tokenizer without a pad token pads with EOS: flexo never trains a converted model's
    embeddings, so the pad row's frozen gradient does not matter."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, use_fast=True)
    except Exception as e:  # noqa: BLE001 — tokenizers raise JSON, key, attribute and OS errors alike
        raise _fail(source.path, f"its tokenizer cannot be loaded ({type(e).__name__}): the folder needs "
                                 "tokenizer.json and tokenizer_config.json") from None
    if not getattr(tok, "is_fast", False) or not (source.path / "tokenizer.json").is_file():
        raise _fail(source.path, "has no tokenizer.json (a fast tokenizer): save the tokenizer with transformers")
    if len(tok) > source.config["vocab_size"]:
        raise _fail(source.path, f"its tokenizer has {len(tok)} tokens but the embedding only "
                                 f"{source.config['vocab_size']} rows: the tokenizer is not this model's")
    if tok.eos_token_id is None:
        raise _fail(source.path, "its tokenizer has no EOS token: flexo separates documents with it")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = 1_000_000  # lm-eval's rolling windows decide the length, not the tokenizer
    return tok


def public_config(source: Source) -> dict:
    """The converted model's config.json: the checkpoint's shapes, eps and rope, as a 1-expert FlexOlmo."""
    from transformers import FlexOlmoConfig

    carried = {k: source.config[k] for k in CARRIED if k in source.config}
    if "rope_parameters" not in carried and "rope_theta" in source.config:
        carried["rope_parameters"] = {"rope_type": "default", "rope_theta": source.config["rope_theta"]}
    config = FlexOlmoConfig(**carried, num_experts=1, num_experts_per_tok=1, norm_topk_prob=False,
                            tie_word_embeddings=False, output_router_logits=False).to_dict()
    config["architectures"] = ["FlexOlmoForCausalLM"]
    return config


def _public_specs(source: Source, router_row: np.ndarray) -> Iterator[TensorSpec]:
    """The converted tensors in write order, each read only when it is written."""
    r, cfg = source.reader, source.config
    head, per_layer, tail = shared_keys(r)
    yield from (r.spec(k) for k in head)
    for i in range(cfg["num_hidden_layers"]):
        yield from (r.spec(k) for k in per_layer.get(i, []) if ".mlp." not in k)
        p = f"model.layers.{i}.mlp."
        if source.model_type == "olmo2":
            yield from (r.spec(f"{p}{part}.weight", f"{p}experts.0.{part}.weight") for part in FFN_PARTS)
        else:
            yield from r.expert_ffn(i, 0, cfg["intermediate_size"], f"{p}experts.0.")
        yield TensorSpec(f"{p}gate.weight", (1, cfg["hidden_size"]), source.dtype, lambda: router_row)
    yield from (r.spec(k) for k in tail)
    if "lm_head.weight" not in r:  # tied embeddings: flexo's models keep their own head
        yield r.spec("model.embed_tokens.weight", "lm_head.weight")


def write_public_model(source: Source, router_row: np.ndarray, folder: Path, shard_bytes: int) -> int:
    """Write the converted public model's weights and config into `folder`; returns its parameter count.
    `router_row` is r_pub's bytes in the checkpoint's dtype."""
    writer = ShardWriter(folder, shard_bytes, what=f"model.init_from {source.path}")
    writer.add_all(_public_specs(source, router_row))
    writer.close()
    write_config_json(public_config(source), folder)
    return writer.total_params
