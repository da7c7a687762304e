"""Router tuning: only the router rows change, only public data (and the owners' router embeddings) is
read, the output keeps the merged format; disabled → a marked copy."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import stages.router_tune as rt_mod
from conftest import all_tensors, copy_project, run_cli
from flexo.layout import Layout
from flexo.modeling import read_meta
from stages.router_tune import router_tune


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory):
    """A copy of the tiny project with the owners' data deleted (router tuning must not need it), merged."""
    project = copy_project(tiny_project, tmp_path_factory.mktemp("rt") / "proj", merged=True,
                           ignore=shutil.ignore_patterns(".cache"))
    params, layout = project.params, project.layout
    for owner in params.owners:
        shutil.rmtree(layout.curated(owner))
        shutil.rmtree(layout.heldout(owner), ignore_errors=True)
        shutil.rmtree(layout.owner_inbox(owner))
    params.embed.max_tokens = 32  # faster embedding of the public documents on 2 cores
    return params, layout


def test_router_tuning_changes_router_rows_only(project, monkeypatch):
    params, layout = project
    params.router_tune.method = "proxy"
    read = []
    real = rt_mod.read_split
    monkeypatch.setattr(rt_mod, "read_split", lambda lay, name, split: (read.append(name), real(lay, name, split))[1])
    meta = router_tune(params, layout)
    assert set(read) == {"public"}

    before, after = all_tensors(layout.merged), all_tensors(layout.merged_rt)
    assert before.keys() == after.keys()
    routers = [k for k in before if k.endswith("mlp.gate.weight")]
    assert len(routers) == params.model.num_layers
    for k in before:
        if k in routers:
            assert before[k].shape == after[k].shape and not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k

    assert meta == read_meta(layout.merged_rt)
    assert meta["kind"] == "merged-rt" and meta["tuned"] is True and meta["opt_out_guarantee"] == "instant"
    assert meta["experts"] == ["public", "alpha", "beta"] and meta["top_k"] == read_meta(layout.merged)["top_k"]
    sel = meta["router_tune"]["proxy_selection"]
    assert set(sel) == {"alpha", "beta"}
    for figures in sel.values():
        assert figures["proxy_documents"] == params.router_tune.proxy_documents == figures["random_documents"]
        assert figures["similarity_max"] >= figures["similarity_mean"] >= figures["similarity_all_public_mean"]
    assert meta["router_tune"]["steps"] == params.router_tune.steps
    for f in ("config.json", "tokenizer.json", "README.md", "loss.csv"):
        assert (layout.merged_rt / f).is_file(), f
    cfg = json.loads((layout.merged_rt / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"]) == (3, meta["top_k"], False)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(layout.merged_rt).config.num_experts == 3


def test_disabled_writes_a_marked_copy(project):
    params, layout = project
    off = copy.deepcopy(params)
    off.router_tune.method = "none"
    meta = router_tune(off, layout)
    assert meta["kind"] == "merged-rt" and meta["tuned"] is False and meta["opt_out_guarantee"] == "instant"
    a, b = all_tensors(layout.merged), all_tensors(layout.merged_rt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (layout.merged_rt / "tokenizer.json").is_file() and "disabled" in (layout.merged_rt / "README.md").read_text()


def test_cli_router_tune(project, tmp_path):
    params, layout = project
    root = tmp_path / "p"
    root.mkdir()
    text = layout.params.read_text().replace("router_tune: {", "router_tune: {method: none, ")
    (root / "params.yaml").write_text(text)
    rc, _, err = run_cli(["--root", str(root), "router-tune"])
    assert rc == 2 and "flexo merge" in err  # no merged model yet
    assert not Layout.at(root).merged_rt.exists()
    shutil.copytree(layout.merged, Layout.at(root).merged)
    rc, out, err = run_cli(["--root", str(root), "router-tune"])
    assert rc == 0, err
    assert json.loads(out)["tuned"] is False
