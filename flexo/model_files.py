"""What a flexo model folder holds, read and written without torch or transformers: the manifest
(`flexo.json`), the file names, the top-k rule and the config as JSON.

The merge and the opt-out only move bytes between model folders, so they use this module and
`flexo.weights` and never import torch or transformers (half a gigabyte of memory and seconds of start-up
for a step that is otherwise bound by the disk: docs/bench). `flexo.modeling` re-exports these names
for the stages that build models.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_file, read_json, write_json
from flexo.params import OWNER_NAME, PUBLIC

log = logging.getLogger(__name__)

META = "flexo.json"
CONFIG = "config.json"
# Files a served model needs besides its weights and config (copied verbatim when present).
SUPPORT_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# Every file flexo writes into a model folder (globs): a folder holding anything else is not replaced.
MODEL_FILES = (CONFIG, META, "README.md", "loss.csv", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "router_stats.safetensors", "router_refits.safetensors", *SUPPORT_FILES)


# ------------------------------------------------------------------------------------------------ top-k
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


# ----------------------------------------------------------------------------------------------- config
# The config keys the merge and the opt-out read, and their JSON type.
_CONFIG_INTS = ("num_experts", "num_experts_per_tok", "num_hidden_layers", "hidden_size", "intermediate_size")


def read_config_json(folder: Path) -> dict:
    """A flex_olmo model folder's config.json as a dict, the keys the weight-moving stages use checked
    (a full validation is `flexo.modeling.load_config`, which needs transformers)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FlexoError(f"{folder} is not a model folder (no config.json): run the stage that writes it first")
    config = read_json(path, what="model config")
    if config.get("model_type") != "flex_olmo":
        raise FlexoError(f"{folder} holds a {config.get('model_type')!r} model, not flex_olmo: convert it with "
                         "train-public")
    for key in _CONFIG_INTS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlexoError(f"{path}: {key} must be a positive integer, got {value!r}: rerun the stage that wrote it")
    return config


def with_experts_json(config: dict, num_experts: int, top_k: int) -> dict:
    """The config of the same model with `num_experts` experts, `top_k` of them active per token."""
    check_top_k(top_k, num_experts)
    # FlexOlmo gating (softmax over all experts, top-k kept without renormalisation) is what makes opt-out exact.
    return dict(config, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False,
                architectures=["FlexOlmoForCausalLM"])


def write_config_json(config: dict, folder: Path) -> None:
    """config.json as transformers' `save_pretrained` writes it (sorted keys, two-space indent)."""
    with atomic_file(Path(folder) / CONFIG) as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


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


def needs_refit(meta: dict) -> bool:
    """Whether opting an owner out of this model must refit the router rows to be exact (flexo.refit)."""
    return (meta.get("router_tune") or {}).get("method") == "federated"


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
