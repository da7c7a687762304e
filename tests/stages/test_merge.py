"""`flexo merge`: exact semantics (public-only ≡ public model, {public, alpha} ≡ alpha's own model, router
rows kept bit for bit), sharding, streaming, and every bad input as a one-line error with no output."""

from __future__ import annotations

import copy
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import stages.merge as merge_mod
from flexo.errors import FlexoError
from flexo.fsutil import sha256_file
from flexo.modeling import fingerprint, load_model, read_meta
from flexo.params import load_params
from flexo.weights import WeightReader
from stages.merge import merge
from flexo.cli import main as run_cli  # every stage's subcommand is registered
from conftest import all_tensors


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
        pkg = _package_copy(layout, owner, tmp_path / owner)
        m = json.loads((pkg / "expert.json").read_text())
        m["public_fingerprint"] = meta["fingerprint"]
        (pkg / "expert.json").write_text(json.dumps(m))
    out = tmp_path / "m"
    merge(params, layout, public=pub, experts=[tmp_path / "alpha", tmp_path / "beta"], out=out)
    a, b = all_tensors(out), all_tensors(merged)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_streams_one_layer_at_a_time(ctx, tmp_path, monkeypatch):
    """Every tensor read through safe_open is tracked until it is freed: the merge never holds more than
    one shard (here sized to one layer) plus one layer's tensors, far less than the whole model."""
    params, layout = ctx
    live = {"bytes": 0, "peak": 0}

    def track(t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        live["bytes"] += n
        live["peak"] = max(live["peak"], live["bytes"])
        weakref.finalize(t, lambda: live.__setitem__("bytes", live["bytes"] - n))
        return t

    class Slice:
        def __init__(self, s):
            self.s = s

        def __getitem__(self, idx):
            return track(self.s[idx])

        def __getattr__(self, name):
            return getattr(self.s, name)

    class Handle:
        def __init__(self, h):
            self.h = h

        def get_tensor(self, key):
            return track(self.h.get_tensor(key))

        def get_slice(self, key):
            return Slice(self.h.get_slice(key))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __getattr__(self, name):
            return getattr(self.h, name)

    import flexo.weights as weights_mod

    real_open = weights_mod.safe_open
    monkeypatch.setattr(weights_mod, "safe_open", lambda *a, **k: Handle(real_open(*a, **k)))

    with WeightReader(layout.public_model, "public") as pub:
        shared = sum(pub.get(k).nbytes for k in pub.keys() if k.startswith("model.layers.0."))
        ffn = sum(pub.get(k).nbytes for k in pub.keys() if k.startswith("model.layers.0.mlp.experts."))
    layer_bytes = shared + 2 * ffn  # one merged layer: shared part + 3 FFNs (public + 2 owners)
    total = sum(t.nbytes for t in all_tensors(layout.public_model).values()) + 2 * 2 * ffn
    small = copy.deepcopy(params)
    small.merge.shard_bytes = layer_bytes
    live.update(bytes=0, peak=0)
    merge(small, layout, out=tmp_path / "streamed")
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) >= 3, "one shard per layer"
    # Streamed tensor by tensor: never a whole shard (= one layer here) in memory, let alone the model.
    assert live["peak"] < layer_bytes, (live, layer_bytes)
    assert live["peak"] < total * 0.25, (live, total)


# ------------------------------------------------------------------------------------------ bad input
def _package_copy(layout, owner: str, dst: Path) -> Path:
    shutil.copytree(layout.expert(owner), dst, ignore=shutil.ignore_patterns("model", "loss.csv"))
    return dst


def _rehash(pkg: Path) -> None:
    meta = json.loads((pkg / "expert.json").read_text())
    meta["tensors_sha256"] = sha256_file(pkg / "expert.safetensors")
    (pkg / "expert.json").write_text(json.dumps(meta))


def _experts(*paths) -> tuple[list[str], dict]:
    return ["--expert", *map(str, paths)], {"experts": list(paths)}


def _truncated(layout, tmp):
    pkg = _package_copy(layout, "alpha", tmp / "alpha")
    data = (pkg / "expert.safetensors").read_bytes()
    (pkg / "expert.safetensors").write_bytes(data[: len(data) // 2])
    return *_experts(pkg, layout.expert("beta")), "corrupt or truncated"


def _unreadable(layout, tmp):
    pkg = _package_copy(layout, "alpha", tmp / "alpha")
    (pkg / "expert.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    _rehash(pkg)  # the hash matches, the file is still not safetensors
    return *_experts(pkg), "unreadable"


def _nan(layout, tmp):
    pkg = _package_copy(layout, "alpha", tmp / "alpha")
    t = load_file(pkg / "expert.safetensors")
    t["layers.1.up_proj"][3, 4] = float("nan")
    save_file(t, str(pkg / "expert.safetensors"))
    _rehash(pkg)
    return *_experts(pkg), "NaN"


def _wrong_fingerprint(layout, tmp):
    pkg = _package_copy(layout, "beta", tmp / "beta")
    meta = json.loads((pkg / "expert.json").read_text())
    meta["public_fingerprint"] = "0" * 64
    (pkg / "expert.json").write_text(json.dumps(meta))
    return *_experts(layout.expert("alpha"), pkg), "fingerprint"


def _wrong_shape(layout, tmp):
    pkg = _package_copy(layout, "alpha", tmp / "alpha")
    t = load_file(pkg / "expert.safetensors")
    t["layers.0.router"] = torch.zeros(16)
    save_file(t, str(pkg / "expert.safetensors"))
    _rehash(pkg)
    return *_experts(pkg), "layers.0.router"


def _twice(layout, tmp):
    return *_experts(layout.expert("alpha"), layout.expert("alpha")), "twice"


def _not_a_package(layout, tmp):
    (tmp / "alpha").mkdir()
    return *_experts(tmp / "alpha"), "not an expert package"


def _top_k_too_large(layout, tmp):
    return ["--top-k", "4"], {"top_k": 4}, "top-k 4"


def _exclude_unknown(layout, tmp):
    return ["--exclude", "gamma"], {"exclude": ["gamma"]}, "gamma"


def _exclude_public(layout, tmp):
    return ["--exclude", "public"], {"exclude": ["public"]}, "public expert cannot be excluded"


BAD = [_truncated, _unreadable, _nan, _wrong_fingerprint, _wrong_shape, _twice, _not_a_package, _top_k_too_large,
       _exclude_unknown, _exclude_public]


@pytest.mark.parametrize("case", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_input_is_one_line_error_exit_2_and_no_output(ctx, tmp_path, capsys, case):
    params, layout = ctx
    args, kwargs, words = case(layout, tmp_path)
    out = tmp_path / "out"
    rc = run_cli(["--root", str(layout.root), "merge", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("flexo: error: ") and words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    with pytest.raises(FlexoError) as e:  # the same through the function
        merge(params, layout, out=out, **kwargs)
    assert words in str(e.value)
    assert not out.exists()


def test_cli_merge_success_prints_manifest(ctx, tmp_path, capsys):
    params, layout = ctx
    out = tmp_path / "m"
    rc = run_cli(["--root", str(layout.root), "merge", "--exclude", "alpha", "--top-k", "1", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["experts"] == ["public", "beta"] and printed["top_k"] == 1 == read_meta(out)["top_k"]


# ----------------------------------------------------------------------------------------- withdrawal
def _project_copy(ctx, tmp_path):
    from flexo.layout import Layout

    _, layout = ctx
    shutil.copytree(layout.root, tmp_path / "p")
    return Layout.at(tmp_path / "p")


def _withdraw_beta(layout, *, lock: bool) -> None:
    import yaml

    raw = yaml.safe_load(layout.params.read_text())
    raw["owners"] = ["alpha"]
    layout.params.write_text(yaml.safe_dump(raw))
    if lock:  # DVC's record of the last merge: it had alpha and beta
        (layout.root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
            "merge": {"cmd": "flexo merge", "params": {"params.yaml": {"owners": ["alpha", "beta"]}}},
            "train_expert@beta": {"cmd": "flexo train-expert --owner beta"}}}))


def test_withdrawal_cleans_up_only_after_a_successful_merge(ctx, tmp_path, caplog):
    layout = _project_copy(ctx, tmp_path)
    params = load_params(layout.params)
    merge(params, layout)  # the last merge: alpha and beta
    _withdraw_beta(layout, lock=True)
    params = load_params(layout.params)
    with caplog.at_level("INFO", logger="flexo.owners"):
        meta = merge(params, layout)
    assert meta["experts"] == ["public", "alpha"]
    assert set(meta["withdrawn_removed"]["beta"]) == {"data/curated/beta", "data/heldout/beta",
                                                      "models/router/beta.safetensors", "models/router/beta.json",
                                                      "models/experts/beta"}
    assert not layout.expert("beta").exists() and layout.expert("alpha").exists()
    assert "train_expert@beta" not in (layout.root / "dvc.lock").read_text()
    assert any("withdrawn owner beta: removed models/experts/beta" in r.getMessage() for r in caplog.records)


def test_a_package_never_merged_is_never_deleted(ctx, tmp_path):
    """A package received before its owner is in params.yaml, and a withdrawn owner whose package no merge
    ever used: both stay (the withdrawn owner's data and rows go, per dvc.lock)."""
    layout = _project_copy(ctx, tmp_path)
    shutil.copytree(layout.expert("beta"), layout.root / "models" / "experts" / "gamma")
    _withdraw_beta(layout, lock=True)  # no models/merged: no evidence that beta's package was ever merged
    meta = merge(load_params(layout.params), layout)
    assert (layout.root / "models" / "experts" / "gamma" / "expert.safetensors").is_file()
    assert layout.expert("beta").is_dir()
    assert "models/experts/beta" not in meta["withdrawn_removed"]["beta"]
    assert not layout.curated("beta").exists()


def test_without_dvc_the_last_merged_model_says_who_was_withdrawn(ctx, tmp_path):
    layout = _project_copy(ctx, tmp_path)
    merge(load_params(layout.params), layout)
    _withdraw_beta(layout, lock=False)
    meta = merge(load_params(layout.params), layout)
    assert "models/experts/beta" in meta["withdrawn_removed"]["beta"] and not layout.expert("beta").exists()


def test_trained_packages_stay_far_inside_the_scale_bound(ctx, merged):
    """The plausibility bound refuses only the absurd: the tiny project's real experts sit within a few
    times the public expert's scale."""
    params, layout = ctx
    public = all_tensors(layout.public_model)
    worst = 0.0
    for owner in params.owners:
        pkg = load_file(layout.expert(owner) / "expert.safetensors")
        for i in range(params.model.num_layers):
            for part in ("gate_proj", "up_proj", "down_proj"):
                ref = public[f"model.layers.{i}.mlp.experts.0.{part}.weight"]
                worst = max(worst, merge_mod._rms(pkg[f"layers.{i}.{part}"]) / merge_mod._rms(ref))
            r_pub = public[f"model.layers.{i}.mlp.gate.weight"][0]
            worst = max(worst, float(pkg[f"layers.{i}.router"].norm() / r_pub.norm()))
    assert 0.1 < worst < merge_mod.SCALE_BOUND / 20, worst


def test_a_merge_with_another_params_file_withdraws_nobody(ctx, tmp_path):
    """`flexo --params other.yaml merge` listing fewer owners merges them, and deletes nothing of the others:
    only the project's own params.yaml speaks for who was withdrawn."""
    layout = _project_copy(ctx, tmp_path)
    merge(load_params(layout.params), layout)
    other = tmp_path / "alpha-only.yaml"
    other.write_text(layout.params.read_text().replace("owners: [alpha, beta]", "owners: [alpha]"))
    meta = merge(load_params(other), layout)
    assert meta["experts"] == ["public", "alpha"] and "withdrawn_removed" not in meta
    assert layout.expert("beta").is_dir() and layout.curated("beta").is_dir()
