"""The expert package: what one data owner ships, and the only thing of an owner's that the merge reads.

A package is a folder named after its owner (``models/experts/<owner>/``) holding
``expert.safetensors`` — the owner's FFN (gate, up, down) and router row of every layer, nothing
else — and ``expert.json``: owner, the fingerprint of the public model it was trained against, the
shapes, the sha256 of the tensors and the training figures. Never data.

:class:`ExpertPackage` reads and checks one: the manifest's types, the owner bound to the folder's
name (so two packages cannot trade names), the public fingerprint, the tensor names, shapes and dtypes
from the safetensors header (no tensor read), and the sha256 of the bytes (:meth:`verify`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexo.errors import FlexoError, first_line
from flexo.fsutil import read_json, sha256_file, write_json
from flexo.params import PUBLIC, validate_owner_name
from flexo.weights import read_header

PACKAGE_TENSORS = "expert.safetensors"
PACKAGE_META = "expert.json"
FORMAT = "flexo-expert-v1"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def package_shapes(num_layers: int, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of a package for a model of these sizes."""
    shapes = {}
    for i in range(num_layers):
        shapes[f"layers.{i}.gate_proj"] = (inter, hidden)
        shapes[f"layers.{i}.up_proj"] = (inter, hidden)
        shapes[f"layers.{i}.down_proj"] = (hidden, inter)
        shapes[f"layers.{i}.router"] = (hidden,)
    return shapes


@dataclass(frozen=True)
class ExpertPackage:
    folder: Path
    owner: str
    public_fingerprint: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    tensors_sha256: str
    meta: dict[str, Any] = field(repr=False, compare=False)  # the whole manifest (training figures too)

    @property
    def tensors(self) -> Path:
        return self.folder / PACKAGE_TENSORS

    @property
    def where(self) -> str:
        return f"expert package {self.folder} (owner {self.owner})"

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return package_shapes(self.num_layers, self.hidden_size, self.intermediate_size)

    # ------------------------------------------------------------------------------------- reading
    @classmethod
    def read(cls, folder: Path, owner: str | None = None, *, folder_name: str | None = None) -> "ExpertPackage":
        """Read and type-check `folder`'s manifest; its owner must equal the folder's name (and `owner`).
        `folder_name`: the name the folder stands for when it is not its own (a published hand-off,
        `published/<owner>/package`)."""
        folder = Path(folder)
        meta_path = folder / PACKAGE_META
        if not meta_path.is_file():
            raise FlexoError(f"{folder} is not an expert package (no {PACKAGE_META}): run `flexo train-expert` for "
                             "that owner, or pass the package folder")
        meta = read_json(meta_path, what="expert manifest")
        where = f"expert manifest {meta_path}"
        for key in ("owner", "public_fingerprint", "num_layers", "hidden_size", "intermediate_size"):
            if key not in meta:
                raise FlexoError(f"{where} lacks {key!r}: re-export the package with `flexo train-expert`")
        name = validate_owner_name(meta["owner"], where)
        if name == PUBLIC:
            raise FlexoError(f"{where} names owner 'public', the name of expert 0: rename the owner")
        folder_name = folder_name or folder.resolve().name
        if name != folder_name:
            raise FlexoError(f"{where} says owner {name!r} but the package lies in a folder named {folder_name!r}: "
                             f"a package's owner must equal its folder's name; move it to models/experts/{name} "
                             "or re-export it")
        if owner is not None and name != owner:
            raise FlexoError(f"{where} says owner {name!r} where {owner!r} was expected: re-export the package")
        for key in ("num_layers", "hidden_size", "intermediate_size"):
            value = meta[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlexoError(f"{where}: {key} must be a positive integer, got {value!r}: re-export the package")
        if not isinstance(meta["public_fingerprint"], str):
            raise FlexoError(f"{where}: public_fingerprint must be a sha256 string, got {meta['public_fingerprint']!r}: "
                             "re-export the package")
        sha = meta.get("tensors_sha256")
        if sha is None:
            raise FlexoError(f"{where} has no tensors_sha256: re-export it with `flexo train-expert`")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise FlexoError(f"{where}: tensors_sha256 must be 64 hex digits, got {sha!r}: re-export the package")
        return cls(folder, name, meta["public_fingerprint"], meta["num_layers"], meta["hidden_size"],
                   meta["intermediate_size"], sha, meta)

    # ------------------------------------------------------------------------------------- checking
    def check(self, *, public_fingerprint: str, sizes: tuple[int, int, int], dtype: str) -> None:
        """Fingerprint, sizes (layers, hidden, intermediate), tensor names, shapes and dtypes, from the
        manifest and the safetensors header only (the sha256 is :meth:`verify`; values are checked as
        the merge streams them)."""
        if self.public_fingerprint != public_fingerprint:
            raise FlexoError(f"{self.where} was trained against public model fingerprint "
                             f"{self.public_fingerprint[:12]}…, but this public model's fingerprint is "
                             f"{public_fingerprint[:12]}…: retrain it with `flexo train-expert --owner {self.owner}` "
                             "against this public model")
        got = (self.num_layers, self.hidden_size, self.intermediate_size)
        if got != tuple(sizes):
            raise FlexoError(f"{self.where} has (layers, hidden, intermediate) = {got} but the public model has "
                             f"{tuple(sizes)}: retrain it with `flexo train-expert --owner {self.owner}`")
        if not self.tensors.is_file():
            raise FlexoError(f"{self.where}: {PACKAGE_TENSORS} is missing: copy the whole package or retrain it")
        shapes = self.shapes
        try:
            found = {k: (e.shape, e.dtype) for k, e in read_header(self.tensors).items()}
        except (OSError, ValueError) as e:
            self.verify()  # a corrupt copy explains an unreadable header best
            raise FlexoError(f"{self.where}: {PACKAGE_TENSORS} is unreadable ({first_line(e)}): fetch or retrain it") from None
        if set(found) != set(shapes):
            odd = sorted(set(found) ^ set(shapes))
            raise FlexoError(f"{self.where}: tensor names differ from the package format (e.g. {odd[0]}): re-export it")
        for key, shape in shapes.items():
            if found[key] != (shape, dtype):
                raise FlexoError(f"{self.where}: {key} is {found[key][1]} {found[key][0]}, the public model needs "
                                 f"{dtype} {shape}: retrain it against this public model")

    def verify(self) -> None:
        """The sha256 of the tensors file equals the manifest's (a corrupt or truncated copy is refused)."""
        actual = sha256_file(self.tensors)
        if actual != self.tensors_sha256:
            raise FlexoError(f"{self.where}: {PACKAGE_TENSORS} hashes to {actual[:12]}… but {PACKAGE_META} says "
                             f"{self.tensors_sha256[:12]}… (corrupt or truncated copy): fetch the package again")

    # ------------------------------------------------------------------------------------- writing
    @classmethod
    def write(cls, folder: Path, tensors: dict, meta: dict) -> "ExpertPackage":
        """Write `tensors` (package names → tensors) and the manifest into `folder` (a temp folder that
        the caller renames to the owner's name)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # One metadata key: safetensors writes the metadata map in a random order per process, so two keys
        # would make identical weights hash differently from run to run (tensors_sha256, DVC).
        save_file(tensors, str(folder / PACKAGE_TENSORS), metadata={"format": FORMAT})
        meta = dict(meta, format=FORMAT, tensors_sha256=sha256_file(folder / PACKAGE_TENSORS))
        write_json(folder / PACKAGE_META, meta)
        return meta
