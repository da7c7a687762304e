"""flexo.layout: every artifact's path below the project root, in one place, and the folders a
user-given `--out` may never touch."""

from __future__ import annotations

import os
from pathlib import Path

from flexo.layout import Layout


def test_paths_are_below_the_resolved_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = Layout.at(".")
    r = tmp_path.resolve()
    assert layout.root == r and layout.root.is_absolute()
    assert layout.params == r / "params.yaml"
    assert layout.owner_inbox("alpha") == r / "data/owners/alpha"
    assert layout.curated("alpha") == r / "data/curated/alpha"
    assert layout.heldout("alpha") == r / "data/heldout/alpha"
    # train and val with the owner's curated data, test apart (evaluation reads nothing an owner trains on)
    assert layout.split_file("alpha", "train") == r / "data/curated/alpha/train.jsonl"
    assert layout.split_file("alpha", "val") == r / "data/curated/alpha/val.jsonl"
    assert layout.split_file("alpha", "test") == r / "data/heldout/alpha/test.jsonl"
    assert layout.tokenizer == r / "models/tokenizer" and layout.public_model == r / "models/public"
    assert layout.router_embedding("public") == r / "models/router/public.safetensors"
    assert layout.expert("beta") == r / "models/experts/beta"
    assert layout.router_update("beta") == r / "models/router_updates/beta.safetensors"
    assert (layout.merged, layout.merged_rt) == (r / "models/merged", r / "models/merged-rt")
    assert layout.results == r / "results" and layout.checkpoints("expert-alpha") == r / ".cache/checkpoints/expert-alpha"


def test_the_same_root_gives_equal_layouts(tmp_path):
    (tmp_path / "sub").mkdir()
    assert Layout.at(tmp_path / "sub" / "..") == Layout.at(str(tmp_path))


def test_downloads_are_project_local_unless_shared(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEXO_DOWNLOADS", raising=False)
    assert Layout.at(tmp_path).downloads == tmp_path.resolve() / ".cache" / "downloads"
    monkeypatch.setenv("FLEXO_DOWNLOADS", str(tmp_path / "shared"))
    assert Layout.at(tmp_path / "p").downloads == tmp_path / "shared"


def test_protected_holds_the_data_the_artifacts_and_the_code_but_no_output(tmp_path):
    layout = Layout.at(tmp_path)
    rel = {p.relative_to(layout.root).as_posix() for p in layout.protected()}
    assert rel == {"data", "models/tokenizer", "models/public", "models/experts", "models/router",
                   "models/router_updates", ".git", ".dvc", ".cache", "flexo", "stages", "flows", "tests"}
    # what a stage may write with --out: the merged models and results are outputs, not protected
    for out in (layout.merged, layout.merged_rt, layout.results, layout.root / "my-model"):
        assert not any(out == p or p in out.parents for p in layout.protected()), out
    assert all(p.is_absolute() and os.path.commonpath([p, layout.root]) == str(layout.root)
               for p in layout.protected())
    assert isinstance(layout.protected(), tuple) and all(isinstance(p, Path) for p in layout.protected())
