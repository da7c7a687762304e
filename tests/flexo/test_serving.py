"""Serving: a request can exclude owners at run time and is told which experts served it."""

import pytest

from flexo.attribution import attribute_request
from flexo.layout import Layout
from flexo.params import load_params
from flexo.serving import FlexoServer
from stages.merge import merge


@pytest.fixture(scope="module")
def server(tiny_project, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "merged"
    merge(load_params(tiny_project.params), Layout.at(tiny_project.root), out=out, top_k=2)
    return FlexoServer(out)


def test_score_request_reports_the_attribution_it_served(server):
    text = "def parse(value):\n    return value.strip()\n"
    full = server.score_request(text)
    masked = server.score_request(text, exclude=["beta"])
    assert full.loglik != masked.loglik
    assert masked.attribution["prob_share"]["beta"] == 0.0
    assert abs(sum(masked.attribution["prob_share"].values()) - 1.0) < 1e-6
    direct = attribute_request(server.model, server.tokenizer, text, server.experts, exclude=["beta"]).to_dict()
    for expert, share in direct["prob_share"].items():
        assert abs(masked.attribution["prob_share"][expert] - share) < 1e-5
    assert server.score(text, exclude=["beta"]) == pytest.approx(masked.loglik)


def test_generation_reports_attribution_and_respects_the_mask(server):
    r = server.respond("Calculate 12 + 30.", exclude=["alpha"], max_new_tokens=5)
    assert isinstance(r.text, str)
    assert r.attribution["prob_share"]["alpha"] == 0.0
    assert r.attribution["tokens"] >= 5
