"""Serving: a request can exclude owners at run time and is told which experts served it; an excluded
owner scores as in the strictly opted-out model."""

import pytest

from flexo.attribution import attribute_request
from flexo.serving import FlexoServer
from stages.optout import opt_out


@pytest.fixture(scope="module")
def server(merged):
    return FlexoServer(merged)


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


def test_server_scores_and_generates_with_exclusions(merged, tmp_path):
    server = FlexoServer(merged)
    text = "Calculate 12 + 30. Answer: 42"
    full, no_beta = server.score(text), server.score(text, exclude=["beta"])
    assert full < 0 and no_beta < 0 and full != no_beta
    opt_out(merged, ["beta"], tmp_path / "nb")
    opted = FlexoServer(tmp_path / "nb")
    assert abs(opted.score(text) - no_beta) < 1e-4
    assert isinstance(server.generate("Calculate", exclude=["alpha"], max_new_tokens=4), str)
    assert server.score(text) == full  # nothing left masked
