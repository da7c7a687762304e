"""flexo.data: a curated split is read back only if it is the file curate wrote for that owner (the
sha256 in the owner's own manifest), line by line on "\\n" alone, with a one-line error for anything else."""

from __future__ import annotations

import json
import os

import pytest

from flexo.data import curated_manifest, read_split
from flexo.errors import FlexoError
from flexo.fsutil import sha256_file
from flexo.layout import Layout

TEXTS = {"train": ["first document", "a line\u2028separator and a next\x85line inside one text", "tabs\tand\nnewlines"],
         "val": ["validation text"], "test": ["held-out text"]}


def write_split(layout: Layout, name: str, split: str, data: bytes) -> None:
    path = layout.split_file(name, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def curated(tmp_path, name: str = "alpha", texts: dict = TEXTS, manifest_name: str | None = None) -> Layout:
    """A project holding `name`'s three splits (raw UTF-8 JSON lines, as curate writes them) and its manifest."""
    layout = Layout.at(tmp_path)
    for split, rows in texts.items():
        write_split(layout, name, split, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                 for t in rows).encode())
    rehash_manifest(layout, name, manifest_name or name)
    return layout


def rehash_manifest(layout: Layout, name: str, manifest_name: str | None = None) -> None:
    splits = {s: {"sha256": sha256_file(layout.split_file(name, s))} for s in ("train", "val", "test")}
    (layout.curated(name) / "manifest.json").write_text(json.dumps({"name": manifest_name or name, "splits": splits}))


def test_texts_come_back_exactly_split_on_newline_only(tmp_path):
    layout = curated(tmp_path)
    for split, rows in TEXTS.items():
        assert read_split(layout, "alpha", split) == rows
    assert "\u2028" in layout.split_file("alpha", "train").read_text()  # written raw, not escaped
    assert curated_manifest(layout, "alpha")["splits"]["val"]["sha256"] == sha256_file(layout.split_file("alpha", "val"))


def test_a_split_edited_after_curation_is_refused(project_copy):
    layout = project_copy.layout
    assert read_split(layout, "alpha", "train")
    with open(layout.split_file("alpha", "train"), "a") as f:
        f.write(json.dumps({"text": "text that curate never wrote"}) + "\n")
    with pytest.raises(FlexoError, match="sha256 differs"):
        read_split(layout, "alpha", "train")


def test_another_owners_split_is_refused(tmp_path):
    layout = curated(tmp_path / "a", manifest_name="beta")  # alpha's folder, beta's manifest
    with pytest.raises(FlexoError, match="belongs to 'beta', not 'alpha': rerun `flexo curate --owner alpha`"):
        read_split(layout, "alpha", "train")
    layout = curated(tmp_path / "b")
    manifest = json.loads((layout.curated("alpha") / "manifest.json").read_text())
    del manifest["splits"]["val"]
    (layout.curated("alpha") / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FlexoError, match="has no sha256 for every split"):
        curated_manifest(layout, "alpha")


def test_a_linked_curated_folder_is_refused(tmp_path):
    layout = curated(tmp_path, name="beta")
    os.symlink("beta", layout.curated("alpha"))
    for read in (lambda: curated_manifest(layout, "alpha"), lambda: read_split(layout, "alpha", "train")):
        with pytest.raises(FlexoError, match="is a symbolic link \\(to beta\\)"):
            read()


@pytest.mark.parametrize("data, words", [
    (b'{"text": "fine"}\n[1, 2]\n', "line 2 is not a JSON object with a string `text`"),
    (b'{"text": "fine"}\n{"text": 5}\n', "line 2 is not a JSON object"),
    (b'{"text": "caf\xe9"}\n', "byte 13 is not UTF-8"),
    (b"\n\n", "is empty: rerun `flexo curate --owner alpha` with more documents"),
])
def test_a_malformed_split_is_one_line(tmp_path, data, words):
    layout = curated(tmp_path)
    write_split(layout, "alpha", "val", data)
    rehash_manifest(layout, "alpha")  # as if curate had written it: only the content is wrong
    with pytest.raises(FlexoError, match=words) as e:
        read_split(layout, "alpha", "val")
    assert "\n" not in str(e.value)


def test_a_missing_split_names_the_stage_and_the_centre_reads_test_splits_alone(tmp_path):
    layout = curated(tmp_path)
    layout.split_file("alpha", "val").unlink()
    with pytest.raises(FlexoError, match="val.jsonl is missing: run `flexo curate --owner alpha` first"):
        read_split(layout, "alpha", "val")
    # The centre holds held-out test splits without the owner's curated folder (and so its manifest).
    centre = Layout.at(tmp_path / "centre")
    write_split(centre, "alpha", "test", layout.split_file("alpha", "test").read_bytes())
    assert read_split(centre, "alpha", "test") == TEXTS["test"]
    with pytest.raises(FlexoError, match="train.jsonl is missing"):
        read_split(centre, "alpha", "train")
