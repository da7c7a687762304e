"""The curated splits as the later stages read them: each owner's train/val split, bound to its owner.

`read_split(layout, name, split)` is the one way a stage reads text: it checks that the file is the
one `flexo curate --owner <name>` wrote (the sha256 recorded in `data/curated/<name>/manifest.json`,
whose `name` must be that owner), so a split linked, copied or swapped in from another owner's folder
is refused, and parses it line by line with a one-line error for anything that is not a JSON object
with a string `text`.
"""

from __future__ import annotations

import json
import os

from flexo.errors import FlexoError
from flexo.fsutil import read_json, sha256_file
from flexo.layout import Layout

SPLITS = ("train", "val", "test")


def curated_manifest(layout: Layout, name: str) -> dict:
    """`data/curated/<name>/manifest.json`, checked to be `name`'s, with the sha256 of every split."""
    folder = layout.curated(name)
    if folder.is_symlink():
        raise FlexoError(f"{folder} is a symbolic link (to {os.readlink(folder)}): an owner's splits are read only "
                         f"from its own folder; delete the link and rerun `flexo curate --owner {name}`")
    manifest = read_json(folder / "manifest.json", what="curated manifest")
    if manifest.get("name") != name:
        raise FlexoError(f"curated manifest {folder / 'manifest.json'} belongs to {manifest.get('name')!r}, not "
                         f"{name!r}: rerun `flexo curate --owner {name}`")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(isinstance((splits.get(s) or {}).get("sha256"), str) for s in SPLITS):
        raise FlexoError(f"curated manifest {folder / 'manifest.json'} has no sha256 for every split: rerun "
                         f"`flexo curate --owner {name}`")
    return manifest


def read_split(layout: Layout, name: str, split: str) -> list[str]:
    """The texts of one curated split of `name`, checked to be the file curate wrote for `name` (the
    sha256 in its manifest: a split linked or copied from another owner's folder is refused)."""
    path = layout.split_file(name, split)
    if path.parent.is_symlink():
        raise FlexoError(f"{path.parent} is a symbolic link (to {os.readlink(path.parent)}): an owner's splits are "
                         f"read only from its own folder; delete the link and rerun `flexo curate --owner {name}`")
    if not path.is_file():
        raise FlexoError(f"{path} is missing: run `flexo curate --owner {name}` first")
    if split != "test" or layout.curated(name).is_dir():  # the centre holds a held-out split without its manifest
        want = curated_manifest(layout, name)["splits"][split]["sha256"]
        if sha256_file(path) != want:
            raise FlexoError(f"{path} is not the {split} split `flexo curate --owner {name}` wrote (its sha256 differs "
                             f"from the manifest's): rerun `flexo curate --owner {name}`")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FlexoError(f"{path}: byte {e.start} is not UTF-8: rerun `flexo curate --owner {name}`") from None
    texts = []
    # One JSON object per "\n"-terminated line (str.splitlines would also split at U+2028 inside a text).
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise FlexoError(f"{path} line {i} is not a JSON object with a string `text`: rerun "
                             f"`flexo curate --owner {name}`")
        texts.append(row["text"])
    if not texts:
        raise FlexoError(f"{path} is empty: rerun `flexo curate --owner {name}` with more documents")
    return texts
