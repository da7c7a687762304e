"""Routing attribution (`flexo.attribution`, `flexo attribute`, the evaluation's routing analysis):
shares are the model's own router outputs, sum to 1, and an opted-out owner gets exactly 0."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from flexo.attribution import (
    RoutingRecorder, attribute, attribute_request, plot_routing_heatmap, recording, render_routing_markdown,
    routing_capture, routing_table,
)
from flexo.errors import FlexoError
from flexo.evaluation import load_tokenizer_for
from flexo.layout import Layout
from flexo.modeling import load_model, read_meta
from flexo.routing_report import heldout_texts, routing_analysis

EXPERTS = ["public", "alpha", "beta"]


@pytest.fixture(scope="module")
def loaded(merged):
    return load_model(merged), load_tokenizer_for(merged)


@pytest.fixture(scope="module")
def texts(ctx) -> dict[str, list[str]]:
    _, layout = ctx
    return {d: heldout_texts(layout, d, 3) for d in EXPERTS}


@pytest.fixture(scope="module")
def text(texts) -> str:
    return texts["alpha"][0][:600] + "\n" + texts["beta"][0][:400]


def _sums_to_one(shares: dict[str, float]) -> bool:
    return abs(sum(shares.values()) - 1.0) < 1e-6


def test_shares_sum_to_one_per_token_and_layer(loaded, text):
    model, tok = loaded
    cap = routing_capture(model, tok, text, EXPERTS)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert cap.probs.shape == (model.config.num_hidden_layers, n, 3) and cap.top_k == model.config.num_experts_per_tok
    assert torch.allclose(cap.probs.sum(-1), torch.ones(cap.probs.shape[:2]), atol=1e-5)
    assert torch.allclose(cap.gates.sum(-1), torch.ones(cap.gates.shape[:2]), atol=1e-5)
    a = attribute(model, tok, text, EXPERTS)
    assert a.tokens == n and len(a.layers) == model.config.num_hidden_layers
    for m in ("prob_share", "gate_share", "top1_share"):
        assert _sums_to_one(getattr(a, m))
        assert all(_sums_to_one(layer[m]) for layer in a.layers)
    # long texts are cut into windows: same tokens counted, shares still sum to 1
    w = routing_capture(model, tok, text, EXPERTS, window=40)
    assert w.tokens == n and torch.allclose(w.probs[:, :40], cap.probs[:, :40], atol=1e-5)
    assert torch.allclose(w.probs.sum(-1), torch.ones(w.probs.shape[:2]), atol=1e-5)
    d = a.to_dict()
    assert json.loads(json.dumps(d))["dominant"] == a.dominant and d["experts"] == EXPERTS


def test_matches_direct_router_computation(loaded, text):
    """Independent check: softmax(F.linear(input of mlp, gate.weight)) captured by a pre-hook on `mlp`."""
    model, tok = loaded
    ids = tok(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([[tok.eos_token_id, *ids]])
    inputs = []
    handles = [layer.mlp.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
               for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=x)
    finally:
        for h in handles:
            h.remove()
    k = model.config.num_experts_per_tok
    a = attribute(model, tok, text, EXPERTS)
    cap = routing_capture(model, tok, text, EXPERTS)
    for i, (h, layer) in enumerate(zip(inputs, model.model.layers)):
        p = torch.softmax(F.linear(h[0, 1:].float(), layer.mlp.gate.weight.detach().float()), dim=-1)
        top_v, top_i = torch.topk(p, k, dim=-1)
        g = torch.zeros_like(p).scatter(1, top_i, top_v)
        g = g / g.sum(-1, keepdim=True)
        assert torch.allclose(cap.probs[i], p, atol=1e-5)
        assert torch.allclose(cap.gates[i], g, atol=1e-5)
        for j, e in enumerate(EXPERTS):
            assert a.layers[i]["prob_share"][e] == pytest.approx(float(p[:, j].mean()), abs=1e-5)
            assert a.layers[i]["gate_share"][e] == pytest.approx(float(g[:, j].mean()), abs=1e-5)
            assert a.layers[i]["top1_share"][e] == pytest.approx(float((p.argmax(-1) == j).float().mean()), abs=1e-6)
    # top-2 of 3: the applied gate share is not the full probability
    assert any(abs(a.prob_share[e] - a.gate_share[e]) > 1e-4 for e in EXPERTS)


def test_public_model_attributes_everything_to_public(ctx, text):
    _, layout = ctx
    experts = read_meta(layout.public_model)["experts"]
    assert experts == ["public"]
    model, tok = load_model(layout.public_model), load_tokenizer_for(layout.public_model, layout.tokenizer)
    a = attribute(model, tok, text, experts)
    assert a.prob_share == {"public": 1.0} and a.gate_share == {"public": 1.0} and a.top1_share == {"public": 1.0}
    assert all(layer["prob_share"] == {"public": 1.0} for layer in a.layers)
    with pytest.raises(FlexoError, match="expert names"):
        attribute(model, tok, text, EXPERTS)


def test_runtime_opt_out_gives_exactly_zero(loaded, text):
    model, tok = loaded
    full = attribute(model, tok, text, EXPERTS)
    assert full.prob_share["beta"] > 0
    a = attribute_request(model, tok, text, EXPERTS, exclude=["beta"])
    assert a.excluded == ["beta"] and a.top_k == 2
    for m in ("prob_share", "gate_share", "top1_share"):
        assert getattr(a, m)["beta"] == 0.0 and _sums_to_one(getattr(a, m))
        assert all(layer[m]["beta"] == 0.0 for layer in a.layers)
    assert "beta (excluded)" in a.render()
    # the mask is gone afterwards, and an empty exclusion is the plain attribution
    assert attribute(model, tok, text, EXPERTS).prob_share == full.prob_share
    assert attribute_request(model, tok, text, EXPERTS).prob_share == full.prob_share
    with pytest.raises(FlexoError, match="cannot exclude 'gamma'"):
        attribute_request(model, tok, text, EXPERTS, exclude=["gamma"])


def test_strict_opt_out_folder_matches_runtime_mask(loaded, merged, text, tmp_path):
    from stages.optout import opt_out

    model, tok = loaded
    out = tmp_path / "no-beta"
    opt_out(merged, ["beta"], out)
    experts = read_meta(out)["experts"]
    assert experts == ["public", "alpha"]
    strict = attribute(load_model(out), tok, text, experts)
    masked = attribute_request(model, tok, text, EXPERTS, exclude=["beta"])
    for m in ("prob_share", "gate_share", "top1_share"):
        for e in experts:
            assert getattr(strict, m)[e] == pytest.approx(getattr(masked, m)[e], abs=1e-5)


def test_recording_a_forward_matches_attribute(loaded, text):
    model, tok = loaded
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with recording(model, EXPERTS, skip_first=1) as result, torch.no_grad():
        model(input_ids=torch.tensor([[tok.eos_token_id, *ids]]))
    a = attribute(model, tok, text, EXPERTS)
    assert result[0].tokens == a.tokens
    for e in EXPERTS:
        assert result[0].prob_share[e] == pytest.approx(a.prob_share[e], abs=1e-5)
    with pytest.raises(FlexoError, match="no forward pass"):
        RoutingRecorder(model, EXPERTS).capture()


def test_routing_table_and_heatmap(loaded, texts, tmp_path):
    model, tok = loaded
    table = routing_table(model, tok, texts, EXPERTS, max_tokens=48, batch_size=2)
    assert list(table["domains"]) == EXPERTS and table["num_layers"] == model.config.num_hidden_layers
    for d, row in table["domains"].items():
        assert row["documents"] == len(texts[d]) and 0 < row["tokens"] <= 48 * len(texts[d])
        assert _sums_to_one(row["prob_share"]) and _sums_to_one(row["top1_share"])
        assert all(_sums_to_one(layer["prob_share"]) for layer in row["layers"])
    # batching with right padding does not change the routing of the real tokens
    single = routing_table(model, tok, texts, EXPERTS, max_tokens=48, batch_size=1)
    for d in EXPERTS:
        assert single["domains"][d]["tokens"] == table["domains"][d]["tokens"]
        for e in EXPERTS:
            assert single["domains"][d]["prob_share"][e] == pytest.approx(table["domains"][d]["prob_share"][e], abs=1e-5)
    md = render_routing_markdown(table, "t")
    assert "| domain | public | alpha | beta | tokens |" in md and "layer 1" in md
    png = plot_routing_heatmap(table, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_routing_analysis_writes_results(ctx, merged, tmp_path):
    params, layout = ctx
    root = tmp_path / "proj"
    shutil.copytree(layout.root / "data" / "heldout", root / "data" / "heldout")
    shutil.copytree(layout.tokenizer, root / "models" / "tokenizer")
    mine = Layout.at(root)
    out = routing_analysis(params, mine, {"flexolmo": merged, "public": layout.public_model})
    assert "public" in out["skipped"] and list(out["models"]) == ["flexolmo"]
    folder = mine.results / "routing"
    assert sorted(p.name for p in folder.iterdir()) == ["flexolmo.json", "flexolmo.md", "flexolmo.png"]
    table = json.loads((folder / "flexolmo.json").read_text())
    assert table["experts"] == EXPERTS and set(table["domains"]) == set(EXPERTS)
    assert table["documents_per_domain"] == params.evaluate.limit
    assert table["max_tokens"] == params.model.max_seq_len


def test_cli(merged, ctx, tmp_path):
    _, layout = ctx
    rc, _, err = run_cli(["attribute", "--model", str(merged), "--file", str(tmp_path / "nope.txt")])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err

    rc, _, err = run_cli(["attribute", "--model", str(merged), "--text", "x = 1", "--exclude", "gamma"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot exclude 'gamma'" in err

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(merged / "config.json", bare / "config.json")
    rc, _, err = run_cli(["attribute", "--model", str(bare), "--text", "x = 1"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "flexo.json" in err

    doc = tmp_path / "doc.txt"
    doc.write_text("Calculate 12 + 30. Answer: 42\n", encoding="utf-8")
    rc, out, err = run_cli(["attribute", "--model", str(merged), "--file", str(doc), "--json", "--exclude", "alpha"])
    assert rc == 0, err
    data = json.loads(out)
    assert data["experts"] == EXPERTS and data["excluded"] == ["alpha"] and data["prob_share"]["alpha"] == 0.0
    assert _sums_to_one(data["prob_share"]) and len(data["layers"]) == 2

    rc, out, err = run_cli(["attribute", "--model", str(layout.public_model), "--text", "def f(x): return x"])
    assert rc == 0, err
    assert "public" in out and "1.000" in out
