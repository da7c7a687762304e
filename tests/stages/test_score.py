"""The owner-side `score` stage: each owner scores every model on its own held-out split and ships only
numbers; the central `evaluate` stage builds the same table from those numbers with no owner data present."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import copy_project, run_cli

MODELS = ["public", "flexolmo", "soup", "soup-weighted", "btm", "btm-top2", "prompt-routing", "expert:alpha", "expert:beta", "optout:alpha", "optout:beta"]


def test_each_owner_ships_every_row_on_its_own_domain_and_no_text(evaluated):
    layout, params, metrics, _ = evaluated
    for owner in params.owners:
        shipped = json.loads(layout.scores(owner).read_text())
        assert shipped["owner"] == owner and shipped["domain"] == owner and shipped["limit"] == 2
        assert list(shipped["bpb"]) == MODELS
        for m in MODELS:  # the central table's owner columns are exactly the shipped numbers
            assert metrics["bpb"][m][owner] == pytest.approx(shipped["bpb"][m], abs=1e-6)
        assert set(shipped["routing"]) == {"flexolmo", "expert:alpha", "expert:beta"}
        assert all(list(t["domains"]) == [owner] for t in shipped["routing"].values())
        # paired bootstrap replicates per row (means over resampled documents), centred on the shipped value
        assert set(shipped["bootstrap"]) == set(MODELS) and len(shipped["bootstrap"]["btm"]) == 1000
        reps = shipped["bootstrap"]["public"]
        assert min(reps) <= shipped["bpb"]["public"] <= max(reps)
        # numbers only: no piece of the owner's held-out documents is in what it ships
        text = layout.scores(owner).read_text()
        for line in (layout.heldout(owner) / "test.jsonl").read_text().splitlines():
            doc = json.loads(line)["text"]
            for start in range(0, max(1, len(doc) - 24), 200):
                assert doc[start : start + 24] not in text
    # the routing report has every domain: public routed centrally, the owners' from their tables
    routing = json.loads((layout.results / "routing" / "flexolmo.json").read_text())
    assert list(routing["domains"]) == ["public", "alpha", "beta"]


def test_central_evaluate_needs_no_owner_data(evaluated, tmp_path):
    """A clone with no owner's text at all (curated, held-out or inbox) and the owners' shipped scores
    builds the same table as the machine that has everything."""
    layout, params, metrics, _ = evaluated
    project = copy_project(layout, tmp_path / "central")
    central = project.layout
    for owner in params.owners:
        for folder in (central.curated(owner), central.heldout(owner), central.owner_inbox(owner)):
            shutil.rmtree(folder, ignore_errors=True)
    rc, out, err = run_cli(["--root", str(central.root), "evaluate", "--limit", "2"])
    assert rc == 0, err
    again = json.loads((central.results / "metrics.json").read_text())
    assert again["bpb"] == metrics["bpb"] and again["scored_by_owners"] == ["alpha", "beta"]
    assert (central.results / "table.md").read_text() == (layout.results / "table.md").read_text()


def test_score_runs_only_where_the_owners_data_is(evaluated, tmp_path):
    layout, _, _, _ = evaluated
    project = copy_project(layout, tmp_path / "elsewhere")
    shutil.rmtree(project.layout.heldout("alpha"))
    before = project.layout.scores("alpha").read_bytes()
    rc, _, err = run_cli(["--root", str(project.root), "score", "--owner", "alpha", "--limit", "2"])
    assert rc == 2 and err.count("\n") == 1 and "runs on alpha's machine" in err
    assert project.layout.scores("alpha").read_bytes() == before
    rc, _, err = run_cli(["--root", str(project.root), "score", "--owner", "gamma"])
    assert rc == 2 and "gamma" in err and err.count("\n") == 1


def test_prompt_router_reads_the_first_router_layer(evaluated):
    """The prompt-routing classifier: layer 0's router probabilities averaged over the document's tokens."""
    import torch

    from flexo.attribution import routing_capture
    from flexo.evaluation import load_tokenizer_for
    from flexo.modeling import load_model, read_meta
    from flexo.scoring import first_router

    layout, _, _, _ = evaluated
    model, tok = load_model(layout.merged), load_tokenizer_for(layout.merged, layout.tokenizer)
    experts = read_meta(layout.merged)["experts"]
    assert experts[0] == "public"
    text = "Calculate 12 + 30. Answer: 42\nCalculate 7 * 6. Answer: 42"
    ids = tok.encode(text, add_special_tokens=False)
    p = first_router(model, experts, tok.eos_token_id)(ids)
    assert p.shape == (3,) and float(p.sum()) == pytest.approx(1, abs=1e-5)
    direct = routing_capture(model, tok, text, experts).probs[0].mean(dim=0)  # the attribution's own capture
    assert torch.allclose(p, direct, atol=1e-5)
