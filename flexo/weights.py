"""Model weights as safetensors, one tensor at a time: the reader and the streaming shard writer that the
merge, opt-out and router tuning share.

`WeightReader` gives lazy access to a model folder's tensors (one or many shards, the per-expert or the
fused expert form). `ShardWriter` writes `TensorSpec`s — a tensor known by name, shape and dtype before
its bytes are read — into shards of bounded size, computing each shard's header from the specs and then
appending each tensor as it is loaded and checked (NaN/Inf, an optional plausibility check), so memory
holds one tensor at a time. `copy_support_files` and `write_config` complete a stock transformers folder.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from transformers import FlexOlmoConfig

from flexo.errors import FlexoError, first_line
from flexo.modeling import SUPPORT_FILES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FFN_PARTS = ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------ reading weights
def read_tensor(path: Path, key: str, row: int | None = None) -> torch.Tensor:
    """One tensor (or one slice `row` along its first dimension) from a safetensors file.

    The file is opened for this one read: `safe_open` memory-maps the whole file, and every page touched
    stays resident for as long as the mapping is open, so a handle kept open across a merge would end up
    holding the whole model in RSS (page cache, but still counted). Opening per tensor costs one header
    parse and keeps the resident set to the tensors actually held."""
    with safe_open(str(path), framework="pt") as handle:
        if row is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[row : row + 1][0]


# safetensors dtype names and sizes (the format's own spelling: github.com/huggingface/safetensors).
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write, known by name, shape and dtype before its bytes are read (`load` reads them).
    `origin` and `fix` phrase a NaN/Inf error in terms of where the tensor came from."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], torch.Tensor]
    origin: str = ""
    fix: str = "retrain or re-export the model it comes from"
    check: Callable[[torch.Tensor], None] | None = None  # a plausibility check of the loaded tensor

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


class WeightReader:
    """Lazy access to the tensors of a model folder (one or many safetensors files), one tensor at a time.

    Use as a context manager (it indexes which file holds which tensor); `get` reads one tensor,
    `get_row` one slice along the first dimension (one expert of a fused tensor, one router row)."""

    def __init__(self, folder: Path, what: str):
        self.folder = Path(folder)
        self.what = what
        self.key_file: dict[str, Path] = {}
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}

    def __enter__(self) -> "WeightReader":
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FlexoError(f"{self.what} {self.folder} holds no .safetensors weights: rerun the stage that writes it")
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    entries = {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype())
                               for k in handle.keys()}
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise FlexoError(f"{self.what}: {f} is not a readable safetensors file ({first_line(e)}): "
                                 "rerun the stage that writes it") from None
            for k in entries:
                if k in self.key_file:
                    raise FlexoError(f"{self.what}: tensor {k} is in both {self.key_file[k].name} and {f.name}: "
                                     "remove the stale shard and rerun the stage that writes it")
                self.key_file[k] = f
            self.meta.update(entries)
        return self

    def __exit__(self, *exc) -> None:
        pass

    def keys(self) -> list[str]:
        return list(self.key_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def _file(self, key: str) -> Path:
        if key not in self.key_file:
            raise FlexoError(f"{self.what} {self.folder} lacks tensor {key}: it is not a complete flexo model; "
                             "rerun the stage that writes it")
        return self.key_file[key]

    def get(self, key: str, row: int | None = None) -> torch.Tensor:
        path = self._file(key)
        try:
            return read_tensor(path, key, row)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            what = key if row is None else f"{key}[{row}]"
            raise FlexoError(f"{self.what}: cannot read {what} ({first_line(e)}): rerun the stage that writes it") from None

    def get_row(self, key: str, index: int) -> torch.Tensor:
        return self.get(key, index)

    def shape(self, key: str) -> tuple[int, ...]:
        self._file(key)
        return self.meta[key][0]

    def dtype(self, key: str) -> str:
        self._file(key)
        return self.meta[key][1]

    def spec(self, key: str, name: str | None = None) -> TensorSpec:
        """`key` of this folder, to be written as `name` (default the same)."""
        return TensorSpec(name or key, self.shape(key), self.dtype(key), partial(self.get, key))

    def expert_ffn(self, layer: int, expert: int, inter: int, out_prefix: str) -> Iterator[TensorSpec]:
        """Expert `expert`'s gate/up/down of one layer (per-expert or fused form) as `{out_prefix}{part}.weight`."""
        p = f"model.layers.{layer}.mlp.experts."
        if f"{p}{expert}.gate_proj.weight" in self:
            for part in FFN_PARTS:
                yield self.spec(f"{p}{expert}.{part}.weight", f"{out_prefix}{part}.weight")
        else:  # the fused in-memory form [E, 2I, H] (gate rows first, then up) / [E, H, I]
            _, two_inter, hidden = self.shape(f"{p}gate_up_proj")
            dtype = self.dtype(f"{p}gate_up_proj")
            gate_up = partial(self.get_row, f"{p}gate_up_proj", expert)
            yield TensorSpec(f"{out_prefix}gate_proj.weight", (inter, hidden), dtype,
                             lambda: gate_up()[:inter].contiguous())
            yield TensorSpec(f"{out_prefix}up_proj.weight", (two_inter - inter, hidden), dtype,
                             lambda: gate_up()[inter:].contiguous())
            down = self.shape(f"{p}down_proj")
            yield TensorSpec(f"{out_prefix}down_proj.weight", tuple(down[1:]), self.dtype(f"{p}down_proj"),
                             partial(self.get_row, f"{p}down_proj", expert))



def is_moe_key(key: str) -> bool:
    return ".mlp.experts." in key or key.endswith(".mlp.gate.weight")


def shared_keys(reader: WeightReader) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """Keys that are not per-expert, grouped: before the layers (embeddings), per layer, after (norm, head)."""
    head, per_layer, tail = [], {}, []
    for k in sorted(reader.keys()):
        if is_moe_key(k):
            continue
        if k.startswith("model.layers."):
            per_layer.setdefault(int(k.split(".")[2]), []).append(k)
        elif k.startswith("model.embed_tokens."):
            head.append(k)
        else:
            tail.append(k)
    return head, per_layer, tail


# ------------------------------------------------------------------------------------ writing weights
class ShardWriter:
    """Writes tensors, given as `TensorSpec`s, into safetensors shards of at most `max_bytes` (a tensor
    larger than that gets a shard of its own), streaming: a shard's header is computed from the specs,
    then each tensor is loaded, checked for NaN/Inf (a FlexoError naming where it came from) and appended,
    so one tensor is in memory at a time. (safetensors' own `save_file` needs the whole shard in memory.)
    `close` names the shards as transformers does: a single `model.safetensors`, or
    `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`."""

    def __init__(self, folder: Path, max_bytes: int, *, what: str = "merge"):
        self.folder = Path(folder)
        self.max_bytes = max(1, int(max_bytes))
        self.what = what
        self._pending: list[TensorSpec] = []
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0
        self.total_params = 0

    def add(self, spec: TensorSpec) -> None:
        if spec.name in self._seen:
            raise RuntimeError(f"{spec.name} written twice")  # a bug in the caller, not user input
        if self._pending and self._pending_bytes + spec.nbytes > self.max_bytes:
            self.flush()
        self._seen.add(spec.name)
        self._pending.append(spec)
        self._pending_bytes += spec.nbytes
        self.total_bytes += spec.nbytes
        self.total_params += math.prod(spec.shape)

    def add_all(self, specs: Iterable[TensorSpec]) -> None:
        for spec in specs:
            self.add(spec)

    def _checked(self, spec: TensorSpec) -> torch.Tensor:
        t = spec.load()
        if TORCH_DTYPES.get(t.dtype) != spec.dtype or tuple(t.shape) != tuple(spec.shape):
            raise RuntimeError(f"{spec.name}: read {t.dtype} {tuple(t.shape)}, planned {spec.dtype} {spec.shape}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            where = spec.origin or f"{self.what}: tensor {spec.name}"
            raise FlexoError(f"{where} holds NaN or Inf: {spec.fix}")
        if spec.check is not None:
            spec.check(t)
        return t.contiguous()

    def flush(self) -> None:
        if not self._pending:
            return
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self._pending:
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
        path = self.folder / f".shard-{len(self._parts) + 1:05d}.partial"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for spec in self._pending:
                t = self._checked(spec)
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                del t
        self._parts.append((path, [spec.name for spec in self._pending]))
        self._pending, self._pending_bytes = [], 0

    def close(self) -> dict:
        self.flush()
        n = len(self._parts)
        if n == 0:
            raise RuntimeError("no tensors were written")
        if n == 1:
            self._parts[0][0].rename(self.folder / SINGLE)
            return {"files": [SINGLE], "total_size": self.total_bytes}
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._parts, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            files.append(name)
            weight_map.update({k: name for k in names})
        index = {"metadata": {"total_parameters": self.total_params, "total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return {"files": files, "total_size": self.total_bytes}


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer files and generation config of a model folder (a model without a tokenizer is refused)."""
    copied = []
    for name in SUPPORT_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    if not {"tokenizer.json", "tokenizer_config.json"} & set(copied):
        raise FlexoError(f"{src} holds no tokenizer files: rerun the stage that wrote it (`flexo train-public`)")
    return copied


def write_config(config: FlexOlmoConfig, folder: Path) -> None:
    config.norm_topk_prob = False  # FlexOlmo gating; also what makes opt-out exact
    config.architectures = ["FlexOlmoForCausalLM"]
    config.save_pretrained(folder)


