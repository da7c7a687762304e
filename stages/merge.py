"""Stage `merge`: the public model plus n expert packages → one (1+n)-expert FlexOlmo (FlexOlmo §3.4).

    flexo merge [--public DIR] [--expert DIR ...] [--exclude NAME ...] [--top-k K] [--out DIR]

Shared weights (embeddings, attention, norms, LM head), FFN 0 and the router row r_pub come from the
public model; owner i (in the order given, = params.yaml `owners`) contributes FFN i and router row i of
every layer. No training, no data: the merge reads only the public model folder and the packages.

The manifests, shapes, dtypes, duplicate owners, top-k and exclusions are checked before a byte is
written, each failure a one-line FlexoError. The weights are then **streamed** in one pass: every
shard's safetensors header is computed from the tensors' shapes alone, then each tensor is read
(`safe_open`, the file opened per read so no mapping keeps pages resident), checked for NaN/Inf and
appended to the shard file, so memory holds one tensor at a time (one router stack at most) — never a
shard or the state dict. The byte-level checks (each package's sha256, the public model's fingerprint)
run in a second thread at the same time, and the output — written into a temp folder — is renamed into
place only when every check has passed, so a failed merge still leaves no output folder. Before this
(bench/report: save_file per shard, checks as separate passes) the merge read every package three times.

The output is a stock transformers folder (`AutoModelForCausalLM.from_pretrained`, no custom code):
config.json, `model.safetensors` or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`
(per-expert keys `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, the form
`save_pretrained` writes), tokenizer and generation config copied from the public folder, `flexo.json`
and a model card `README.md`. The shard writer, the weight reader and the card are shared with
`stages/optout.py` and `stages/router_tune.py`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from transformers import FlexOlmoConfig

from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_dir
from flexo.layout import Layout
from flexo.modeling import MODEL_FILES, SUPPORT_FILES, fingerprint, load_config, read_meta, with_experts, write_meta
from flexo.package import PACKAGE_TENSORS, ExpertPackage, package_shapes
from flexo.params import PUBLIC, Params

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FFN_PARTS = ("gate_proj", "up_proj", "down_proj")
GUARANTEE_NOTE = (
    "The router is softmax over all experts then top-k without renormalisation, so deleting an expert's FFN "
    "and router row (flexo opt-out) or masking its router logit to -inf at serving time computes the same "
    "function as a model that never contained that expert; no retraining is needed."
)


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
                raise FlexoError(f"{self.what}: {f} is not a readable safetensors file ({_first_line(e)}): "
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
            raise FlexoError(f"{self.what}: cannot read {what} ({_first_line(e)}): rerun the stage that writes it") from None

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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


# ----------------------------------------------------------------------------------------- model card
def model_card(meta: dict) -> str:
    """README.md of a merged model: the experts in router order, top-k, and how to opt one out."""
    experts = meta["experts"]
    training = meta.get("training") or {}
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [flexolmo, mixture-of-experts, flexo]",
        "---",
        "",
        f"# FlexOlmo {meta.get('kind', 'merged')} model ({len(experts)} experts, top-{meta['top_k']})",
        "",
        "Built by flexo from a public model and independently trained expert packages (FlexOlmo, "
        "arXiv 2507.07024). A stock `FlexOlmoForCausalLM`: load it with "
        "`AutoModelForCausalLM.from_pretrained(path)`, no custom code. Router: softmax over all experts, "
        "top-k, no renormalisation (`norm_topk_prob: false`), no router bias (the paper's learnable "
        "negative bias is left out so that stock transformers and vLLM load the model).",
        "",
        f"Public model fingerprint: `{meta.get('fingerprint')}`",
        "",
        "| router row | expert | package sha256 | steps | tokens | val loss |",
        "|---|---|---|---|---|---|",
    ]
    for i, name in enumerate(experts):
        if name == PUBLIC:
            lines.append(f"| {i} | public | (public model) | | | |")
            continue
        t = training.get(name, {})
        sha = (meta.get("packages") or {}).get(name, "")
        lines.append(f"| {i} | {name} | `{sha[:16]}` | {t.get('steps', '')} | {t.get('tokens_seen', '')} | "
                     f"{t.get('val_loss', '')} |")
    if meta.get("opted_out"):
        lines += ["", f"Opted out (removed from this model): {', '.join(meta['opted_out'])}."]
    if meta.get("kind") == "merged-rt":
        rt = meta.get("router_tune") or {}
        lines += ["", "Router rows tuned on public proxy data only." if meta.get("tuned")
                  else "Router tuning was disabled: the weights equal the merged model's.",
                  *([f"Router tuning: {rt.get('steps')} steps on {rt.get('proxy_blocks')} blocks."] if rt else [])]
    example = next((e for e in experts if e != PUBLIC), "OWNER")
    lines += [
        "",
        "## Opting an expert out",
        "",
        f"Opt-out guarantee: **{meta.get('opt_out_guarantee')}**. {meta.get('opt_out_note', GUARANTEE_NOTE)}",
        "",
        "A new model folder without the expert (its FFN and router row deleted from every layer):",
        "",
        "```",
        f"flexo opt-out --model <this folder> --exclude {example} --out <new folder>",
        "```",
        "",
        "Or per request at serving time, without a new folder (the expert's router logit masked to -inf):",
        "",
        "```python",
        "from flexo.serving import FlexoServer",
        "server = FlexoServer('<this folder>')",
        f"server.generate('Once upon a time', exclude=['{example}'])",
        f"server.score('Some text.', exclude=['{example}'])",
        "# or, on a loaded model: with flexo.serving.runtime_opt_out(model, experts, ['" + example + "']): ...",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, meta: dict) -> None:
    (Path(folder) / "README.md").write_text(model_card(meta), encoding="utf-8")


# ---------------------------------------------------------------------------------------- the checks
def _check_public(public: Path, *, verify: bool = True) -> tuple[FlexOlmoConfig, dict]:
    """Config and manifest of the public model; `verify` also recomputes its fingerprint (a full read)."""
    public = Path(public)
    if not (public / "config.json").is_file():
        raise FlexoError(f"public model {public} not found (no config.json): run `flexo train-public` first")
    meta = read_meta(public)
    config = load_config(public)
    if config.num_experts != 1:
        raise FlexoError(f"{public} is not a public model (a 1-expert flex_olmo; it has "
                         f"{config.num_experts} experts): pass the public model folder with --public")
    if not isinstance(meta.get("fingerprint"), str) or not meta["fingerprint"]:
        raise FlexoError(f"public model {public}: flexo.json has no fingerprint string "
                         f"(got {meta.get('fingerprint')!r}): rerun `flexo train-public`")
    if verify:
        _verify_public(public, meta)
    return config, meta


def _verify_public(public: Path, meta: dict) -> None:
    try:
        actual = fingerprint(public)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FlexoError(f"public model {public}: weights unreadable ({_first_line(e)}): rerun `flexo train-public`") from None
    if actual != meta["fingerprint"]:
        raise FlexoError(f"public model {public}: the weights' fingerprint {actual[:12]}… differs from flexo.json's "
                         f"{meta['fingerprint'][:12]}…: the public model changed after it was written; rerun "
                         "`flexo train-public`")


# ------------------------------------------------------------------------------------------ the merge
# A package tensor whose RMS exceeds the public expert's by this factor (or a router row whose norm
# exceeds r_pub's) is not a trained expert but a broken or hostile one: it would take every token (a
# router row) or swamp the residual stream (an FFN). Trained experts start as a copy of the public FFN
# and stay within a few times its scale (tests/test_merge.py measures the tiny project's).
SCALE_BOUND = 1e3


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def _record_rms(spec: TensorSpec, into: dict, key: str) -> TensorSpec:
    def check(t: torch.Tensor) -> None:
        into[key] = _rms(t)
    return replace(spec, check=check)


def _bounded(spec: TensorSpec, reference: dict, key: str, where: str) -> TensorSpec:
    def check(t: torch.Tensor) -> None:
        ref = reference[key]
        if _rms(t) > SCALE_BOUND * max(ref, 1e-12):
            raise FlexoError(f"{where}: tensor {key} has RMS {_rms(t):.3g}, more than {SCALE_BOUND:g}x the public "
                             f"expert's {ref:.3g}: the package is broken or tampered with; retrain or re-export it")
    return replace(spec, check=check)


def _merged_specs(pub: WeightReader, packages: list[ExpertPackage], config: FlexOlmoConfig, dtype: str
                  ) -> Iterator[TensorSpec]:
    """The merged model's tensors in write order (layer after layer). Each owner tensor is checked,
    as it streams, for NaN/Inf and for a scale within SCALE_BOUND of the public expert's same tensor
    (recorded when that one streamed, just before)."""
    head, per_layer, tail = shared_keys(pub)
    for key in head:
        yield pub.spec(key)
    inter, hidden = config.intermediate_size, config.hidden_size
    shapes = package_shapes(config.num_hidden_layers, hidden, inter)
    public_rms: dict[str, float] = {}
    for i in range(config.num_hidden_layers):
        for key in per_layer.get(i, []):
            yield pub.spec(key)
        p = f"model.layers.{i}.mlp."
        for part, spec in zip(FFN_PARTS, pub.expert_ffn(i, 0, inter, f"{p}experts.0.")):
            yield _record_rms(spec, public_rms, f"layers.{i}.{part}")
        for e, package in enumerate(packages, start=1):
            for part in FFN_PARTS:
                key = f"layers.{i}.{part}"
                spec = TensorSpec(f"{p}experts.{e}.{part}.weight", shapes[key], dtype,
                                  partial(read_tensor, package.tensors, key),
                                  origin=f"{package.where}: tensor {key}", fix="retrain it")
                yield _bounded(spec, public_rms, key, package.where)
        yield TensorSpec(f"{p}gate.weight", (1 + len(packages), hidden), dtype,
                         partial(_router_stack, pub, f"{p}gate.weight", packages, i))
    for key in tail:
        yield pub.spec(key)


def _router_stack(pub: WeightReader, key: str, packages: list[ExpertPackage], layer: int) -> torch.Tensor:
    """Row 0 = r_pub from the public model, row e = owner e's row, bit for bit."""
    r_pub = pub.get_row(key, 0)
    rows = [r_pub]
    bound = SCALE_BOUND * max(float(r_pub.double().norm()), 1e-6)
    for package in packages:
        row = read_tensor(package.tensors, f"layers.{layer}.router")
        if not torch.isfinite(row).all():
            raise FlexoError(f"{package.where}: tensor layers.{layer}.router holds NaN or Inf: retrain it")
        norm = float(row.double().norm())
        if norm > bound:
            raise FlexoError(f"{package.where}: router row of layer {layer} has norm {norm:.3g}, more than "
                             f"{SCALE_BOUND:g}x r_pub's: it would take every token; retrain or re-export the package")
        rows.append(row)
    return torch.stack(rows)


def merged_model_guard(layout: Layout, inputs: Sequence[Path], *, user_out: bool) -> OutputGuard:
    """What `flexo merge` may replace: an absent folder or an earlier merged model (not an opt-out or a
    tuned one), never an input or, for a user-given --out, a project folder of owners' data or artifacts."""
    def same_kind(path: Path) -> bool:
        meta = _manifest(path)
        return meta.get("kind") == "merged" and "opted_out" not in meta
    return OutputGuard("merged model", same_kind, tuple(inputs), layout.protected() if user_out else (),
                       command="flexo merge", files=MODEL_FILES, user_out=user_out)


def _manifest(folder: Path) -> dict:
    """A model folder's flexo.json, or {} when there is none or it is not a JSON object."""
    try:
        meta = read_meta(folder)
    except FlexoError:
        return {}
    return meta


def merge(params: Params, layout: Layout, *, public: Path | None = None, experts: list[Path] | None = None,
          exclude: Sequence[str] = (), top_k: int | None = None, out: Path | None = None) -> dict:
    """Merge the public model and the expert packages into `out` (default models/merged); returns flexo.json.

    The pipeline's merge (default packages and output) is the fan-in that reruns when `owners` changes:
    after it has succeeded it removes what the owners withdrawn from params.yaml left behind
    (:func:`stages.status.prune_withdrawn`)."""
    started = time.time()
    pipeline_run = experts is None and out is None
    public = Path(public) if public is not None else layout.public_model
    folders = [Path(e) for e in experts] if experts is not None else [layout.expert(o) for o in params.owners]
    top_k = params.merge.top_k if top_k is None else int(top_k)
    guard = merged_model_guard(layout, [public, *folders], user_out=out is not None)
    out = Path(out) if out is not None else layout.merged
    guard.check(out)
    if pipeline_run:
        from stages.status import withdrawal_plan

        withdrawal = withdrawal_plan(params, layout)

    # 1. Cheap checks on the manifests: names bound to folders, duplicates, exclusions, top-k.
    packages = [ExpertPackage.read(f, owner=params.owners[i] if experts is None else None)
                for i, f in enumerate(folders)]
    seen: dict[str, Path] = {}
    for package in packages:
        if package.owner in seen:
            raise FlexoError(f"owner {package.owner!r} is given twice ({seen[package.owner]} and {package.folder}): "
                             "pass each owner's package once")
        seen[package.owner] = package.folder
    present = [p.owner for p in packages]
    for name in exclude:
        if name == PUBLIC:
            raise FlexoError("the public expert cannot be excluded (it is expert 0 of every FlexOlmo model): "
                             "exclude owners only")
        if name not in present:
            raise FlexoError(f"cannot exclude {name!r}: it is not among the experts being merged {[PUBLIC, *present]}; "
                             "fix --exclude")
    kept = [p for p in packages if p.owner not in set(exclude)]
    n_experts = 1 + len(kept)
    if not 1 <= top_k <= n_experts:
        raise FlexoError(f"top-k {top_k} is out of range: the merged model has {n_experts} experts "
                         f"(public + {len(kept)} owners); pass --top-k (or set merge.top_k) between 1 and {n_experts}")

    # 2. The public model: config, manifest, dtype (its fingerprint is recomputed in step 4).
    config, public_meta = _check_public(public, verify=False)
    public_fp = public_meta["fingerprint"]
    with WeightReader(public, "public model") as pub:
        dtype = pub.dtype("model.layers.0.mlp.gate.weight")

    # 3. Every kept package: fingerprint, names, shapes, dtypes from its header (an excluded one is not read).
    sizes = (config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    for package in kept:
        package.check(public_fingerprint=public_fp, sizes=sizes, dtype=dtype)
    merged_config = with_experts(config, n_experts, top_k)

    # 4. Stream the weights into a temp folder (NaN/Inf and scale checked per tensor) while a second thread
    #    hashes the inputs; the folder becomes `out` only when both are done and every check passed.
    owners = [p.owner for p in kept]
    with atomic_dir(out, guard) as tmp, ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-verify") as pool:
        checks = [pool.submit(_verify_public, public, public_meta)]
        checks += [pool.submit(package.verify) for package in kept]
        writer = ShardWriter(tmp, params.merge.shard_bytes, what="merge")
        try:
            with WeightReader(public, "public model") as pub:
                writer.add_all(_merged_specs(pub, kept, config, dtype))
            written = writer.close()
        except (FlexoError, SafetensorError, OSError, ValueError, RuntimeError):
            _raise_first_failed(checks)  # a corrupt input explains a failed read better than the read does
            raise
        _raise_first_failed(checks)
        write_config(merged_config, tmp)
        copy_support_files(public, tmp)
        meta = {
            "kind": "merged",
            "experts": [PUBLIC, *owners],
            "fingerprint": public_fp,
            "top_k": top_k,
            "num_experts": n_experts,
            "packages": {p.owner: p.tensors_sha256 for p in kept},
            "opt_out_guarantee": "instant",
            "opt_out_note": GUARANTEE_NOTE,
            "excluded": list(exclude),
            "training": {p.owner: {k: p.meta.get(k) for k in ("steps", "tokens_seen", "public_mix", "train_loss",
                                                               "val_loss", "initial_val_loss")} for p in kept},
            "shards": len(written["files"]),
            "bytes": written["total_size"],
            "wall_s": round(time.time() - started, 2),
        }
        write_meta(tmp, meta)
        write_model_card(tmp, meta)
    log.info("merged %d experts (top-%d) into %s in %.1fs", n_experts, top_k, out, time.time() - started)
    if pipeline_run:
        # Only now that the new model is in place: a refused or failed merge deletes nothing.
        from stages.status import prune_withdrawn

        removed = prune_withdrawn(layout, withdrawal)
        if removed:
            meta = dict(meta, withdrawn_removed=removed)
    return meta


def _raise_first_failed(checks: list[Future]) -> None:
    for check in checks:
        check.result()  # re-raises the check's FlexoError


# ----------------------------------------------------------------------------------------------- CLI
def _cmd_merge(args) -> dict:
    from flexo.cli import _ctx

    params, layout = _ctx(args)
    return merge(params, layout, public=args.public, experts=args.expert, exclude=args.exclude or (),
                 top_k=args.top_k, out=args.out)


def add_cli(subparsers) -> None:
    """`flexo merge [--public DIR] [--expert DIR ...] [--exclude NAME ...] [--top-k K] [--out DIR]`."""
    text = "merge the public model and the owners' expert packages into one FlexOlmo MoE"
    p = subparsers.add_parser("merge", help=text, description=text)
    p.add_argument("--public", type=Path, default=None, help="public model folder (default: models/public)")
    p.add_argument("--expert", type=Path, nargs="+", action="extend", default=None, metavar="DIR",
                   help="expert package folders in router order (default: models/experts/<owner> for params.yaml owners)")
    p.add_argument("--exclude", nargs="+", action="extend", default=None, metavar="NAME",
                   help="owners to leave out of the merge")
    p.add_argument("--top-k", type=int, default=None, help="experts active per token (default: merge.top_k)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: models/merged)")
    p.set_defaults(fn=_cmd_merge)
