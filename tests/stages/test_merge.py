"""`flexo merge`: exact semantics (public-only ≡ public model, {public, alpha} ≡ alpha's own model, router
rows kept bit for bit), sharding, and every bad input as a one-line error with no output. Streaming one
tensor at a time is tested in tests/flexo/test_weights.py, the withdrawal clean-up after a merge in
tests/flexo/test_owners.py."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import stages.merge as merge_mod
from conftest import all_tensors, edit_manifest, edit_package, package_copy, rehash, run_cli
from flexo.errors import FlexoError
from flexo.modeling import fingerprint, load_model, read_meta
from stages.merge import merge


def logits(model_dir: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(model_dir)(input_ids=x).logits


@pytest.fixture(scope="module")
def tokens(ctx) -> torch.Tensor:
    return torch.randint(2, 500, (2, 48), generator=torch.Generator().manual_seed(0))


def test_merged_folder_is_a_stock_flexolmo_with_exact_router_rows(ctx, merged):
    params, layout = ctx
    from transformers import AutoModelForCausalLM

    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["architectures"] == ["FlexOlmoForCausalLM"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"]) == (3, 2, False)
    model = AutoModelForCausalLM.from_pretrained(merged)  # no custom code, no flexo loader
    assert type(model).__name__ == "FlexOlmoForCausalLM"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "model.safetensors"):
        assert (merged / f).is_file(), f
    assert not (merged / "model.safetensors.index.json").exists()

    meta = read_meta(merged)
    assert meta["kind"] == "merged" and meta["experts"] == ["public", "alpha", "beta"] and meta["top_k"] == 2
    assert meta["fingerprint"] == read_meta(layout.public_model)["fingerprint"]
    assert meta["opt_out_guarantee"] == "instant" and "renormalisation" in meta["opt_out_note"]
    for owner in ("alpha", "beta"):
        assert meta["packages"][owner] == json.loads((layout.expert(owner) / "expert.json").read_text())["tensors_sha256"]
    card = (merged / "README.md").read_text()
    assert "flexo opt-out" in card and "runtime_opt_out" in card and "exclude=" in card
    assert "alpha" in card and "beta" in card

    t = all_tensors(merged)
    pub = all_tensors(layout.public_model)
    pkgs = [load_file(layout.expert(o) / "expert.safetensors") for o in ("alpha", "beta")]
    for i in range(params.model.num_layers):
        gate = t[f"model.layers.{i}.mlp.gate.weight"]
        assert gate.shape == (3, params.model.hidden_size)
        assert torch.equal(gate[0], pub[f"model.layers.{i}.mlp.gate.weight"][0])
        for e, pkg in enumerate(pkgs, start=1):
            assert torch.equal(gate[e], pkg[f"layers.{i}.router"])
            for part in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(t[f"model.layers.{i}.mlp.experts.{e}.{part}.weight"], pkg[f"layers.{i}.{part}"])
    for k, v in pub.items():  # every public tensor is carried over bit for bit
        if not k.endswith("mlp.gate.weight"):
            assert torch.equal(t[k], v), k


def test_public_only_merge_is_the_public_model(ctx, tmp_path, tokens):
    params, layout = ctx
    out = tmp_path / "pub-only"
    meta = merge(params, layout, experts=[], top_k=1, out=out)
    assert meta["experts"] == ["public"]
    assert torch.equal(logits(out, tokens), logits(layout.public_model, tokens))


def test_public_plus_alpha_is_alphas_own_model(ctx, tmp_path, tokens):
    params, layout = ctx
    out = tmp_path / "alpha"
    merge(params, layout, exclude=["beta"], top_k=2, out=out)
    assert read_meta(out)["experts"] == ["public", "alpha"]
    own = layout.expert("alpha") / "model"
    torch.testing.assert_close(logits(out, tokens), logits(own, tokens), rtol=0, atol=1e-6)
    # and the same tensors as alpha's own 2-expert model
    a, b = all_tensors(out), all_tensors(own)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_shards_load_and_equal_one_shard(ctx, merged, tmp_path, tokens):
    params, layout = ctx
    small = copy.deepcopy(params)
    small.merge.shard_bytes = 100_000  # below the params.yaml minimum on purpose: the tiny model is ~0.3 MB
    out = tmp_path / "sharded"
    meta = merge(small, layout, out=out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert meta["shards"] == len(shards) >= 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for s in shards:
        assert sum(t.numel() * t.element_size() for t in load_file(s).values()) <= 100_000
    one, many = all_tensors(merged), all_tensors(out)
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    assert torch.equal(logits(out, tokens), logits(merged, tokens))


def test_public_model_in_fused_form_merges_the_same(ctx, merged, tmp_path):
    """A public folder holding the fused in-memory form (experts.gate_up_proj [1, 2I, H]) merges identically."""
    params, layout = ctx
    pub = tmp_path / "public-fused"
    shutil.copytree(layout.public_model, pub)
    t = load_file(pub / "model.safetensors")
    for i in range(params.model.num_layers):
        p = f"model.layers.{i}.mlp.experts."
        gate, up, down = (t.pop(f"{p}0.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
        t[f"{p}gate_up_proj"] = torch.cat([gate, up])[None]
        t[f"{p}down_proj"] = down[None]
    save_file(t, str(pub / "model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((pub / "flexo.json").read_text())
    meta["fingerprint"] = fingerprint(pub)
    (pub / "flexo.json").write_text(json.dumps(meta))
    for owner in ("alpha", "beta"):  # packages name the public model they were trained on
        edit_manifest(package_copy(layout, owner, tmp_path / owner), public_fingerprint=meta["fingerprint"])
    out = tmp_path / "m"
    merge(params, layout, public=pub, experts=[tmp_path / "alpha", tmp_path / "beta"], out=out)
    a, b = all_tensors(out), all_tensors(merged)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ bad input
def _experts(*paths) -> tuple[list[str], dict]:
    return ["--expert", *map(str, paths)], {"experts": list(paths)}


def _truncated(layout, tmp):
    pkg = package_copy(layout, "alpha", tmp / "alpha")
    data = (pkg / "expert.safetensors").read_bytes()
    (pkg / "expert.safetensors").write_bytes(data[: len(data) // 2])
    return *_experts(pkg, layout.expert("beta")), "corrupt or truncated"


def _unreadable(layout, tmp):
    pkg = package_copy(layout, "alpha", tmp / "alpha")
    (pkg / "expert.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    rehash(pkg)  # the hash matches, the file is still not safetensors
    return *_experts(pkg), "unreadable"


def _nan(layout, tmp):
    pkg = package_copy(layout, "alpha", tmp / "alpha")
    edit_package(pkg, lambda t: t["layers.1.up_proj"].__setitem__((3, 4), float("nan")))
    return *_experts(pkg), "NaN"


def _wrong_fingerprint(layout, tmp):
    pkg = package_copy(layout, "beta", tmp / "beta")
    edit_manifest(pkg, public_fingerprint="0" * 64)
    return *_experts(layout.expert("alpha"), pkg), "fingerprint"


def _wrong_shape(layout, tmp):
    pkg = package_copy(layout, "alpha", tmp / "alpha")
    edit_package(pkg, lambda t: t.__setitem__("layers.0.router", torch.zeros(16)))
    return *_experts(pkg), "layers.0.router"


def _twice(layout, tmp):
    return *_experts(layout.expert("alpha"), layout.expert("alpha")), "twice"


def _not_a_package(layout, tmp):
    (tmp / "alpha").mkdir()
    return *_experts(tmp / "alpha"), "not an expert package"


def _top_k_zero(layout, tmp):
    return ["--top-k", "0"], {"top_k": 0}, "top-k 0"


def _exclude_unknown(layout, tmp):
    return ["--exclude", "gamma"], {"exclude": ["gamma"]}, "gamma"


def _exclude_public(layout, tmp):
    return ["--exclude", "public"], {"exclude": ["public"]}, "public expert cannot be excluded"


BAD = [_truncated, _unreadable, _nan, _wrong_fingerprint, _wrong_shape, _twice, _not_a_package, _top_k_zero,
       _exclude_unknown, _exclude_public]


@pytest.mark.parametrize("case", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_input_is_one_line_error_exit_2_and_no_output(ctx, tmp_path, case):
    params, layout = ctx
    args, kwargs, words = case(layout, tmp_path)
    out = tmp_path / "out"
    rc, _, err = run_cli(["--root", str(layout.root), "merge", *args, "--out", str(out)])
    assert rc == 2, err
    assert err.startswith("flexo: error: ") and words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    with pytest.raises(FlexoError) as e:  # the same through the function
        merge(params, layout, out=out, **kwargs)
    assert words in str(e.value)
    assert not out.exists()


def test_cli_merge_success_prints_manifest(ctx, tmp_path):
    params, layout = ctx
    out = tmp_path / "m"
    rc, printed, err = run_cli(["--root", str(layout.root), "merge", "--exclude", "alpha", "--top-k", "1", "--out",
                                str(out)])
    assert rc == 0, err
    printed = json.loads(printed)
    assert printed["experts"] == ["public", "beta"] and printed["top_k"] == 1 == read_meta(out)["top_k"]


def test_trained_packages_stay_far_inside_the_scale_bound(ctx, merged):
    """The plausibility bound refuses only the absurd: the tiny project's real experts sit within a few
    times the public expert's scale."""
    from flexo.weights import rms

    params, layout = ctx
    public = all_tensors(layout.public_model)
    worst = 0.0
    for owner in params.owners:
        pkg = load_file(layout.expert(owner) / "expert.safetensors")
        for i in range(params.model.num_layers):
            for part in ("gate_proj", "up_proj", "down_proj"):
                ref = public[f"model.layers.{i}.mlp.experts.0.{part}.weight"]
                worst = max(worst, rms(pkg[f"layers.{i}.{part}"].numpy()) / rms(ref.numpy()))
            r_pub = public[f"model.layers.{i}.mlp.gate.weight"][0]
            worst = max(worst, float(pkg[f"layers.{i}.router"].norm() / r_pub.norm()))
    assert 0.1 < worst < merge_mod.SCALE_BOUND / 20, worst


def test_top_k_above_the_experts_is_clamped_and_recorded(ctx, tmp_path):
    """One rule for merge and opt-out: top-k above the experts left is clamped, recorded, and said."""
    from stages.optout import opt_out

    params, layout = ctx
    meta = merge(params, layout, top_k=3, out=tmp_path / "m3")  # 3 experts: top-3 of 3, as the RT model runs 7 of 7
    assert meta["top_k"] == 3 and "top_k_requested" not in meta
    meta = merge(params, layout, exclude=["beta"], top_k=3, out=tmp_path / "m2")
    assert meta["top_k"] == 2 and meta["top_k_requested"] == 3
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["num_experts_per_tok"] == 2
    opted = opt_out(tmp_path / "m3", ["beta"], tmp_path / "o2")
    assert opted["top_k"] == 2 and opted["top_k_requested"] == 3
    assert torch.equal(logits(tmp_path / "o2", torch.tensor([[5, 6, 7, 8]])), logits(tmp_path / "m2", torch.tensor([[5, 6, 7, 8]])))
