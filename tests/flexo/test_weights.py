"""flexo.weights: `ShardWriter` writes bounded shards tensor by tensor (transformers' names and index,
NaN/Inf refused naming the tensor's origin), `WeightReader` reads one tensor's or one row's bytes at a
time from one or many shards (per-expert or fused expert form), the fingerprint equals the one computed
from torch tensors, and the merge built on them streams."""

from __future__ import annotations

import copy
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import all_tensors
from flexo.errors import FlexoError
from flexo.weights import INDEX, SINGLE, ShardWriter, TensorSpec, WeightReader, fingerprint
from stages.merge import merge

TORCH_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def raw(t: torch.Tensor):
    """A tensor's bytes, as the reader returns them and the writer takes them."""
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def spec(name: str, t: torch.Tensor, **kw) -> TensorSpec:
    return TensorSpec(name, tuple(t.shape), TORCH_DTYPES[t.dtype], lambda: raw(t), **kw)


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 4, generator=g),  # 64 bytes
            "b": torch.randn(8, generator=g).to(torch.bfloat16),  # 16 bytes
            "c": torch.randn(16, 4, generator=g)}  # 256 bytes: more than a shard may hold


# ------------------------------------------------------------------------------------------ ShardWriter
def test_shards_are_bounded_named_like_transformers_and_round_trip(tmp_path, tensors):
    writer = ShardWriter(tmp_path, max_bytes=100)
    writer.add_all(spec(k, t) for k, t in tensors.items())
    assert writer.close() == {"files": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
                              "total_size": 64 + 16 + 256}
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                                   "c": "model-00002-of-00002.safetensors"}  # c, too large, has a shard of its own
    assert index["metadata"] == {"total_parameters": 16 + 8 + 64, "total_size": 336}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [INDEX, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])  # no .partial left
    back = all_tensors(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], t) and back[k].dtype == t.dtype
                                                  for k, t in tensors.items())


def test_one_shard_is_model_safetensors_without_an_index(tmp_path, tensors):
    writer = ShardWriter(tmp_path, max_bytes=10_000)
    writer.add_all(spec(k, t) for k, t in tensors.items())
    assert writer.close()["files"] == [SINGLE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE]
    assert torch.equal(load_file(tmp_path / SINGLE)["c"], tensors["c"])


def test_nan_is_refused_naming_where_the_tensor_came_from(tmp_path, tensors):
    bad = tensors["a"].clone()
    bad[1, 2] = float("inf")
    writer = ShardWriter(tmp_path, max_bytes=10_000)
    writer.add(spec("a", bad, origin="expert package alpha: layers.0.up_proj", fix="retrain alpha"))
    with pytest.raises(FlexoError, match=r"^expert package alpha: layers.0.up_proj holds NaN or Inf: retrain alpha$"):
        writer.close()
    writer = ShardWriter(tmp_path / "x", max_bytes=10_000, what="opt-out")
    (tmp_path / "x").mkdir()
    writer.add(spec("b", torch.tensor([float("nan")])))
    with pytest.raises(FlexoError, match="opt-out: tensor b holds NaN or Inf"):
        writer.close()


def test_a_name_written_twice_or_a_wrong_plan_is_a_bug(tmp_path, tensors):
    writer = ShardWriter(tmp_path, max_bytes=10_000)
    writer.add(spec("a", tensors["a"]))
    with pytest.raises(RuntimeError, match="written twice"):
        writer.add(spec("a", tensors["a"]))
    writer.add(TensorSpec("c", (4, 8), "F32", lambda: raw(tensors["c"])))  # planned half its size
    with pytest.raises(RuntimeError, match=r"read 256 bytes, planned F32 \(4, 8\) = 128"):
        writer.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nan_and_inf_are_found_in_half_precision_bytes_too(tmp_path, dtype):
    for i, value in enumerate([float("nan"), float("-inf")]):
        t = torch.ones(3, 5, dtype=dtype)
        t[2, 4] = value
        writer = ShardWriter(tmp_path / str(i), max_bytes=10_000)
        (tmp_path / str(i)).mkdir()
        writer.add(spec("w", t))
        with pytest.raises(FlexoError, match="tensor w holds NaN or Inf"):
            writer.close()
    writer = ShardWriter(tmp_path / "ok", max_bytes=10_000)
    (tmp_path / "ok").mkdir()
    writer.add(spec("w", torch.full((3, 5), 6.0e4 if dtype == torch.float16 else 3.0e38, dtype=dtype)))  # large, finite
    writer.close()


def test_the_fingerprint_is_the_one_computed_from_torch_tensors(tmp_path, tensors):
    """The byte-level fingerprint equals flexo's first, torch-based definition (name|torch dtype|shape|bytes
    in name order), so models fingerprinted before keep their fingerprint."""
    import hashlib

    folder = _two_shards(tmp_path / "m", tensors)
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    assert fingerprint(folder) == h.hexdigest()
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\x08\x00\x00\x00")
    with pytest.raises(FlexoError, match="model-00002-of-00002.safetensors is not a readable safetensors file"):
        fingerprint(folder)


# ----------------------------------------------------------------------------------------- WeightReader
def _two_shards(folder, tensors):
    folder.mkdir(exist_ok=True)
    save_file({"a": tensors["a"], "b": tensors["b"]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"c": tensors["c"]}, str(folder / "model-00002-of-00002.safetensors"))
    return folder


def test_reader_reads_tensors_rows_shapes_and_dtypes_across_shards(tmp_path, tensors):
    with WeightReader(_two_shards(tmp_path / "m", tensors), "public model") as r:
        assert sorted(r.keys()) == ["a", "b", "c"] and "c" in r and "d" not in r
        assert r.shape("c") == (16, 4) and r.dtype("b") == "BF16" and r.dtype("a") == "F32"
        assert bytes(r.get("c")) == bytes(raw(tensors["c"])) and bytes(r.get_row("a", 2)) == bytes(raw(tensors["a"][2]))
        s = r.spec("c", "renamed")
        assert (s.name, s.shape, s.dtype, s.nbytes) == ("renamed", (16, 4), "F32", 256)
        assert bytes(s.load()) == bytes(raw(tensors["c"]))
        with pytest.raises(FlexoError, match="public model .* lacks tensor d: it is not a complete flexo model"):
            r.get("d")


def test_reader_refusals(tmp_path, tensors):
    with pytest.raises(FlexoError, match="holds no .safetensors weights"):
        WeightReader(tmp_path, "merged model").__enter__()
    folder = _two_shards(tmp_path / "dup", tensors)
    save_file({"fit/mean": tensors["a"]}, str(folder / "router_stats.safetensors"))  # not a weight shard: not read
    with WeightReader(folder, "merged model") as r:
        assert sorted(r.keys()) == ["a", "b", "c"]
    save_file({"c": tensors["c"]}, str(folder / "model.safetensors"))
    with pytest.raises(FlexoError, match="tensor c is in both model-00002-of-00002.safetensors and model.safetensors"):
        WeightReader(folder, "merged model").__enter__()
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(FlexoError, match="model.safetensors is not a readable safetensors file"):
        WeightReader(folder, "merged model").__enter__()
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (folder / "model-00002-of-00002.safetensors").write_bytes(
        (folder / "model-00002-of-00002.safetensors").read_bytes()[:-8])  # truncated: the header names bytes it lacks
    with pytest.raises(FlexoError, match=r"model-00002-of-00002.safetensors is not a readable safetensors file "
                                         r"\(tensor c: F32 \[16, 4\] does not fit bytes"):
        WeightReader(folder, "merged model").__enter__()


def test_expert_ffn_reads_the_per_expert_and_the_fused_form_alike(tmp_path):
    g = torch.Generator().manual_seed(1)
    inter, hidden, experts = 6, 4, 2
    parts = {e: {n: torch.randn(*(inter, hidden) if n != "down_proj" else (hidden, inter), generator=g)
                 for n in ("gate_proj", "up_proj", "down_proj")} for e in range(experts)}
    p = "model.layers.0.mlp.experts."
    (tmp_path / "per").mkdir()
    save_file({f"{p}{e}.{n}.weight": t for e in parts for n, t in parts[e].items()},
              str(tmp_path / "per" / SINGLE))
    (tmp_path / "fused").mkdir()
    save_file({f"{p}gate_up_proj": torch.stack([torch.cat([parts[e]["gate_proj"], parts[e]["up_proj"]])
                                                for e in range(experts)]),
               f"{p}down_proj": torch.stack([parts[e]["down_proj"] for e in range(experts)])},
              str(tmp_path / "fused" / SINGLE))
    for form in ("per", "fused"):
        with WeightReader(tmp_path / form, form) as r:
            specs = list(r.expert_ffn(0, 1, inter, "out."))
        assert [s.name for s in specs] == ["out.gate_proj.weight", "out.up_proj.weight", "out.down_proj.weight"]
        for s, part in zip(specs, ("gate_proj", "up_proj", "down_proj")):
            assert s.shape == tuple(parts[1][part].shape), (form, part)
            assert bytes(s.load()) == bytes(raw(parts[1][part])), (form, part)


# ------------------------------------------------------------------------------------ streaming merge
def test_merge_streams_one_layer_at_a_time(ctx, tmp_path, monkeypatch):
    """Every tensor's bytes read from a file are tracked until they are freed: the merge never holds more
    than one shard (here sized to one layer) plus one layer's tensors, far less than the whole model."""
    params, layout = ctx
    live = {"bytes": 0, "peak": 0}
    import flexo.weights as weights_mod

    real_read = weights_mod.read_bytes

    def tracked_read(*a, **k):
        arr = real_read(*a, **k)
        n = arr.nbytes
        live["bytes"] += n
        live["peak"] = max(live["peak"], live["bytes"])
        weakref.finalize(arr, lambda: live.__setitem__("bytes", live["bytes"] - n))
        return arr

    monkeypatch.setattr(weights_mod, "read_bytes", tracked_read)

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
    # Streamed tensor by tensor: one tensor being written and one being hashed by the verifying thread at
    # most, never a whole shard (= one layer here), let alone the model.
    with WeightReader(layout.public_model, "public") as pub:
        largest = max(pub.entry(k).nbytes for k in pub.keys())
    assert live["peak"] <= 2 * largest, (live, largest)
    assert live["peak"] < layer_bytes + largest, (live, layer_bytes)
    assert live["peak"] < total * 0.5, (live, total)
