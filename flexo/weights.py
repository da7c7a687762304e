"""Model weights as safetensors bytes, one tensor at a time, without torch: the reader and the streaming
shard writer that the merge and the opt-out share (and the fingerprint every stage checks).

The merge and the opt-out change no number: they move tensors between files. So they work on the file
format itself (an 8-byte header length, a JSON header naming each tensor's dtype, shape and byte range,
then the data), read each tensor's bytes with one positioned read, scan them for NaN/Inf through a numpy
view on the way, and append them to the output shard whose header was computed from the shapes before a
byte was read. No torch or transformers import, no deserialisation, one tensor in memory at a time: the
cost is the bytes moved (docs/bench).

`WeightReader` gives byte access to a model folder's tensors (one or many shards, the per-expert or the
fused expert form); `ShardWriter` writes `TensorSpec`s into shards of bounded size named as transformers
names them; `fingerprint` hashes a folder's weights independent of sharding; `copy_support_files`
completes a stock transformers folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from flexo.errors import FlexoError, first_line
from flexo.model_files import SUPPORT_FILES, safetensors_files

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARDS = (SINGLE, "model-*-of-*.safetensors")  # a model's weight files (not the router fit's inputs beside them)
FFN_PARTS = ("gate_proj", "up_proj", "down_proj")

# safetensors dtype names and sizes (the format's own spelling: github.com/huggingface/safetensors).
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
          "BOOL": "?"}
# torch's names of the same dtypes: the fingerprint hashes them (it was first computed from torch tensors).
TORCH_NAMES = {"F64": "torch.float64", "F32": "torch.float32", "BF16": "torch.bfloat16", "F16": "torch.float16",
               "I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8",
               "U8": "torch.uint8", "BOOL": "torch.bool"}
FLOATS = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100_000_000  # the format's own bound on the JSON header
CHUNK = 1 << 26  # read a big tensor for hashing in 64 MiB pieces


# ------------------------------------------------------------------------------------ the file format
@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its dtype, shape and absolute byte range in `path`."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of a safetensors file, from its header only; ValueError if the header is malformed or
    names bytes the file does not have (a truncated copy)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"header length {n} does not fit the file's {size} bytes")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    base, entries = 8 + n, {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {name}: malformed header entry") from None
        if (dtype not in DTYPE_BYTES or not isinstance(begin, int) or not isinstance(end, int) or begin < 0
                or end - begin != math.prod(shape) * DTYPE_BYTES[dtype] or base + end > size):
            raise ValueError(f"tensor {name}: {dtype} {list(shape)} does not fit bytes [{begin}, {end}) of the file")
        entries[name] = Entry(path, dtype, shape, base + begin, base + end)
    return entries


def read_bytes(entry: Entry, offset: int = 0, length: int | None = None) -> np.ndarray:
    """`length` bytes of a tensor from `offset` (default all of it) as a read-only uint8 array."""
    length = entry.nbytes - offset if length is None else length
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        buf = os.pread(fd, length, entry.start + offset)
    finally:
        os.close(fd)
    if len(buf) != length:
        raise ValueError(f"{entry.path}: {len(buf)} of {length} bytes readable (truncated)")
    return np.frombuffer(buf, dtype=np.uint8)


def float_values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The numbers of a float tensor's bytes (bf16 widened to fp32 exactly), for the checks."""
    if dtype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return raw.view(_NUMPY[dtype])


def _sum_squares(values: np.ndarray) -> float:
    v = values.reshape(-1) if values.dtype != np.float16 else values.reshape(-1).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an answer here (see all_finite), not a warning
        return float(np.dot(v, v))


def all_finite(values: np.ndarray) -> bool:
    """No NaN or Inf among `values`. One BLAS pass: a NaN or an Inf makes the sum of squares NaN or Inf,
    so a finite sum proves them absent; only a non-finite one (either, or an overflow) is scanned exactly."""
    return math.isfinite(_sum_squares(values)) or bool(np.isfinite(values).all())


# Bytes widened at a time by the NaN/Inf check of a tensor being written: a bf16 embedding of 0.4 GB would
# otherwise need two fp32-sized copies (1.6 GB) beside it; in chunks the check costs ~50 MB whatever the tensor.
CHECK_CHUNK_BYTES = 1 << 24


def all_finite_bytes(raw: np.ndarray, dtype: str) -> bool:
    """`all_finite` of a float tensor given as bytes, checked chunk by chunk."""
    step = CHECK_CHUNK_BYTES - CHECK_CHUNK_BYTES % DTYPE_BYTES[dtype]
    return all(all_finite(float_values(raw[i:i + step], dtype)) for i in range(0, raw.size, step))


def rms(values: np.ndarray) -> float:
    if not values.size:
        return 0.0
    total = _sum_squares(values)
    if not math.isfinite(total):  # fp32 overflow of a large but finite tensor: sum in fp64
        v = values.reshape(-1).astype(np.float64)
        total = float(np.dot(v, v))
    return math.sqrt(total / values.size)


def fingerprint(model_dir: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order, one tensor at a time.

    Independent of sharding and of file-level metadata, so the same weights always give the same value."""
    h = hashlib.sha256()
    f = Path(model_dir)
    try:
        entries: list[tuple[str, Entry]] = []
        for f in safetensors_files(model_dir):
            entries += read_header(f).items()
        for key, e in sorted(entries, key=lambda kv: (kv[0], str(kv[1].path))):
            f = e.path
            h.update(f"{key}|{TORCH_NAMES[e.dtype]}|{e.shape}|".encode())
            for offset in range(0, e.nbytes, CHUNK):
                h.update(read_bytes(e, offset, min(CHUNK, e.nbytes - offset)).data)
    except (OSError, ValueError) as e:  # corrupt or truncated weights
        raise FlexoError(f"{f} is not a readable safetensors file ({first_line(e)}): rerun the stage that writes it") from None
    return h.hexdigest()


# ------------------------------------------------------------------------------------ reading weights
@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write, known by name, shape and dtype before its bytes are read (`load` reads them, as
    a uint8 array or any array whose bytes are the tensor's). `origin` and `fix` phrase a NaN/Inf error in
    terms of where the tensor came from; `check` sees the tensor's numbers (float tensors only)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], np.ndarray]
    origin: str = ""
    fix: str = "retrain or re-export the model it comes from"
    check: Callable[[np.ndarray], None] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


class WeightReader:
    """Byte access to the tensors of a model folder (its model shards; or the given `files`), one tensor
    at a time.

    Use as a context manager (it reads every header, so it knows which file holds which tensor); `get`
    reads one tensor's bytes, `get_row` one slice along the first dimension (one expert of a fused tensor,
    one router row). Each read opens the file for one positioned read: nothing stays mapped or resident."""

    def __init__(self, folder: Path, what: str, files: Iterable[Path] | None = None):
        self.folder = Path(folder)
        self.what = what
        self.files = [Path(f) for f in files] if files is not None else None
        self.entries: dict[str, Entry] = {}

    def __enter__(self) -> "WeightReader":
        return self.open()

    def open(self) -> "WeightReader":
        """Read every header (also what entering the context does)."""
        files = self.files if self.files is not None else sorted({f for g in SHARDS for f in self.folder.glob(g)})
        if not files:
            raise FlexoError(f"{self.what} {self.folder} holds no .safetensors weights: rerun the stage that writes it")
        for f in files:
            try:
                entries = read_header(f)
            except (OSError, ValueError) as e:
                raise FlexoError(f"{self.what}: {f} is not a readable safetensors file ({first_line(e)}): "
                                 "rerun the stage that writes it") from None
            for k in entries:
                if k in self.entries:
                    raise FlexoError(f"{self.what}: tensor {k} is in both {self.entries[k].path.name} and {f.name}: "
                                     "remove the stale shard and rerun the stage that writes it")
            self.entries.update(entries)
        return self

    def __exit__(self, *exc) -> None:
        pass

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def entry(self, key: str) -> Entry:
        if key not in self.entries:
            raise FlexoError(f"{self.what} {self.folder} lacks tensor {key}: it is not a complete flexo model; "
                             "rerun the stage that writes it")
        return self.entries[key]

    def get(self, key: str, row: int | None = None) -> np.ndarray:
        e = self.entry(key)
        try:
            if row is None:
                return read_bytes(e)
            size = e.nbytes // e.shape[0]
            return read_bytes(e, row * size, size)
        except (OSError, ValueError) as err:
            what = key if row is None else f"{key}[{row}]"
            raise FlexoError(f"{self.what}: cannot read {what} ({first_line(err)}): rerun the stage that writes it") from None

    def get_row(self, key: str, index: int) -> np.ndarray:
        return self.get(key, index)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entry(key).shape

    def dtype(self, key: str) -> str:
        return self.entry(key).dtype

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
            gate_bytes = inter * hidden * DTYPE_BYTES[dtype]
            gate_up = partial(self.get_row, f"{p}gate_up_proj", expert)
            yield TensorSpec(f"{out_prefix}gate_proj.weight", (inter, hidden), dtype, lambda: gate_up()[:gate_bytes])
            yield TensorSpec(f"{out_prefix}up_proj.weight", (two_inter - inter, hidden), dtype,
                             lambda: gate_up()[gate_bytes:])
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
    then each tensor's bytes are loaded, checked for NaN/Inf (a FlexoError naming where they came from)
    and appended, so one tensor is in memory at a time. (safetensors' own `save_file` needs the whole
    shard in memory.) `close` names the shards as transformers does: a single `model.safetensors`, or
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

    def _checked(self, spec: TensorSpec) -> np.ndarray:
        raw = np.ascontiguousarray(spec.load()).reshape(-1).view(np.uint8)
        if raw.size != spec.nbytes:
            raise RuntimeError(f"{spec.name}: read {raw.size} bytes, planned {spec.dtype} {spec.shape} = {spec.nbytes}")
        if spec.dtype in FLOATS:
            if not all_finite_bytes(raw, spec.dtype):
                where = spec.origin or f"{self.what}: tensor {spec.name}"
                raise FlexoError(f"{where} holds NaN or Inf: {spec.fix}")
            if spec.check is not None:
                spec.check(float_values(raw, spec.dtype))
        return raw

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
                f.write(self._checked(spec).data)
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
