"""Opt-out: strict removal (`flexo opt-out`) ≡ merging without the owner ≡ masking it at runtime
(`flexo.routers.runtime_opt_out`), plus the refusals. The runtime mask alone is tested in
tests/flexo/test_routers.py, the serving class in tests/flexo/test_serving.py."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch

from conftest import all_tensors, run_cli
from flexo.errors import FlexoError
from flexo.modeling import load_model, read_meta
from flexo.routers import runtime_opt_out
from stages.merge import merge
from stages.optout import opt_out

EXPERTS = ["public", "alpha", "beta"]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(2, 500, (3, 40), generator=torch.Generator().manual_seed(1))


def test_opt_out_equals_merge_without_and_runtime_mask(ctx, merged, tmp_path, tokens):
    params, layout = ctx
    out = tmp_path / "no-beta"
    meta = opt_out(merged, ["beta"], out)
    assert meta["experts"] == ["public", "alpha"] and meta["opted_out"] == ["beta"] and meta["top_k"] == 2
    assert "beta" not in meta["packages"] and read_meta(out) == meta
    assert "Opted out" in (out / "README.md").read_text() and "beta" in (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"]) == (2, 2, False)

    # strict removal writes exactly the tensors a merge without beta writes
    ref = tmp_path / "merged-without-beta"
    merge(params, layout, exclude=["beta"], out=ref)
    a, b = all_tensors(out), all_tensors(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # ... and computes what the full model computes with beta masked at runtime
    full = load_model(merged)
    with torch.no_grad():
        before = full(input_ids=tokens).logits
        with runtime_opt_out(full, EXPERTS, ["beta"]):
            masked = full(input_ids=tokens).logits
        after = full(input_ids=tokens).logits
        removed = load_model(out)(input_ids=tokens).logits
    torch.testing.assert_close(masked, removed, rtol=0, atol=1e-6)
    assert not torch.allclose(before, masked)  # beta did matter
    assert torch.equal(before, after)  # restored exactly
    assert all("forward" not in m.mlp.gate.__dict__ for m in full.model.layers)


def test_top_k_shrinks_to_experts_left(ctx, tmp_path, tokens):
    params, layout = ctx
    all3 = tmp_path / "top3"
    merge(params, layout, top_k=3, out=all3)
    out = tmp_path / "top3-no-alpha"
    assert opt_out(all3, ["alpha"], out)["top_k"] == 2
    full = load_model(all3)
    with torch.no_grad(), runtime_opt_out(full, EXPERTS, ["alpha"]):
        masked = full(input_ids=tokens).logits
    with torch.no_grad():
        removed = load_model(out)(input_ids=tokens).logits
    torch.testing.assert_close(masked, removed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("exclude,words", [(["gamma"], "'gamma'"), (["public"], "public expert"),
                                           (["alpha", "beta"], "every owner")])
def test_refusals_exit_2_and_write_nothing(ctx, merged, tmp_path, exclude, words):
    params, layout = ctx
    out = tmp_path / "out"
    with pytest.raises(FlexoError) as e:
        opt_out(merged, exclude, out)
    assert words in str(e.value)
    if exclude == ["gamma"]:
        assert "['public', 'alpha', 'beta']" in str(e.value)  # lists the model's experts
    rc, _, err = run_cli(["--root", str(layout.root), "opt-out", "--model", str(merged), "--exclude", *exclude,
                          "--out", str(out)])
    assert rc == 2 and err.startswith("flexo: error: ") and words in err and "Traceback" not in err
    assert not out.exists()


def test_cli_opt_out(ctx, merged, tmp_path):
    params, layout = ctx
    out = tmp_path / "cli"
    rc, printed, err = run_cli(["--root", str(layout.root), "opt-out", "--model", str(merged), "--exclude", "alpha",
                                "--out", str(out)])
    assert rc == 0, err
    assert json.loads(printed)["experts"] == ["public", "beta"]


def test_sharded_model_and_non_instant_guarantee(ctx, merged, tmp_path, caplog):
    params, layout = ctx
    small = copy.deepcopy(params)
    small.merge.shard_bytes = 100_000
    sharded = tmp_path / "sharded"
    merge(small, layout, out=sharded)
    meta = json.loads((sharded / "flexo.json").read_text())
    meta["opt_out_guarantee"] = "rerun"  # as a model tuned on owner data would say
    (sharded / "flexo.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        result = opt_out(sharded, ["beta"], out, shard_bytes=100_000)
    assert result["rerun_needed"] is True and "rerun" in caplog.text
    assert (out / "model.safetensors.index.json").is_file()
    opt_out(merged, ["beta"], tmp_path / "ref")
    ref = all_tensors(tmp_path / "ref")
    got = all_tensors(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    shutil.rmtree(sharded)
