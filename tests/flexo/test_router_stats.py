"""flexo.router_stats: the centre reads an owner's router statistics only if they are that owner's, not
skipped, of this public model and sound (the checks of flexo.router_fit), and says which owner command
to run when they are not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from flexo.errors import FlexoError
from flexo.layout import Layout
from flexo.router_fit import feature_stats
from flexo.router_stats import MIN_TOKENS, read_update

LAYERS, HIDDEN, FP = 2, 8, "a" * 64


def write_update(layout: Layout, name: str, tokens: int = MIN_TOKENS, **info) -> dict:
    """Statistics at `name`'s path, as `flexo router-update --owner NAME` writes them (`info` overrides
    the manifest's fields, `owner` included)."""
    g = torch.Generator().manual_seed(0)
    stats = feature_stats([torch.randn(tokens, HIDDEN, generator=g) for _ in range(LAYERS)])
    path = layout.router_update(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(stats, str(path))
    path.with_suffix(".json").write_text(json.dumps({"owner": name, "public_fingerprint": FP, **info}))
    return stats


def read(layout: Layout, owner: str = "alpha"):
    return read_update(layout, owner, FP, LAYERS, HIDDEN)[0]


def test_an_owners_statistics_are_read_back(tmp_path):
    layout = Layout.at(tmp_path)
    written = write_update(layout, "alpha")
    got = read(layout)
    assert got.keys() == written.keys() and all(torch.equal(got[k], written[k]) for k in got)
    assert int(got["tokens"]) == MIN_TOKENS
    assert read_update(layout, "alpha", None, LAYERS, HIDDEN)[0].keys() == got.keys()  # no fingerprint to compare


@pytest.mark.parametrize("setup, words", [
    (lambda L: None, "no router statistics of 'alpha' .*: run `flexo router-update --owner alpha`"),
    (lambda L: write_update(L, "alpha", skipped=True, method="proxy"),
     "statistics of 'alpha' were skipped \\(method proxy\\): rerun `flexo router-update --owner alpha` with "
     "router_tune.method: federated"),
    (lambda L: write_update(L, "alpha", public_fingerprint="b" * 64),
     "come from an expert trained against another public model: rerun `flexo train-expert --owner alpha`"),
    (lambda L: write_update(L, "alpha", owner="beta"), "say owner 'beta', not 'alpha'"),
    (lambda L: write_update(L, "alpha", tokens=MIN_TOKENS - 1), f"summarise {MIN_TOKENS - 1} tokens, at least {MIN_TOKENS}"),
    (lambda L: (write_update(L, "alpha"), L.router_update("alpha").write_bytes(b"garbage")),
     "router statistics .*alpha.safetensors are unreadable"),
])
def test_refusals_name_the_owner_command(tmp_path, setup, words):
    layout = Layout.at(tmp_path)
    setup(layout)
    with pytest.raises(FlexoError, match=words) as e:
        read(layout)
    assert "\n" not in str(e.value)


def test_another_owners_file_under_this_owners_name_is_refused(tmp_path):
    layout = Layout.at(tmp_path)
    write_update(layout, "beta")
    for suffix in (".safetensors", ".json"):  # beta's statistics copied over alpha's
        layout.router_update("alpha").parent.joinpath("alpha" + suffix).write_bytes(
            layout.router_update("beta").with_suffix(suffix).read_bytes())
    with pytest.raises(FlexoError, match="say owner 'beta', not 'alpha'"):
        read(layout)


def test_a_low_rank_form_is_expanded_to_its_covariance(tmp_path):
    """Top-r eigenpairs plus an isotropic rest, as `router_tune.stats_rank` ships them, read back dense."""
    from flexo.router_stats import dense, summarize

    g = torch.Generator().manual_seed(1)
    features = [torch.randn(4000, HIDDEN, generator=g) * torch.arange(1, HIDDEN + 1) for _ in range(LAYERS)]
    full = summarize(features, torch.zeros(4000, dtype=torch.long))
    low = summarize(features, torch.zeros(4000, dtype=torch.long), rank=3)
    assert low["layers.0.eigvecs"].shape == (3, HIDDEN) and low["layers.0.rest"].shape == (1,)
    cov, approx = full["layers.0.cov"].double(), dense(low, LAYERS)["layers.0.cov"].double()
    top = torch.linalg.eigvalsh(cov)[-3:]
    assert torch.allclose(torch.linalg.eigvalsh(approx)[-3:], top, rtol=1e-4)  # the top of the spectrum kept
    assert float(torch.trace(approx)) == pytest.approx(float(torch.trace(cov)), rel=1e-4)  # the rest's mass too


def test_dp_noise_shrinks_with_the_budget_and_comes_from_the_secret():
    from flexo.router_stats import Privacy, calibrate, summarize

    g = torch.Generator().manual_seed(2)
    features = [torch.randn(6000, HIDDEN, generator=g) + 3 for _ in range(LAYERS)]
    docs = torch.arange(6000) // 60  # 100 documents of 60 tokens
    exact = summarize(features, docs)
    errors = {}
    for eps in (0.5, 8.0):
        privacy = Privacy(eps, 1e-5, [4.0] * LAYERS, 60, calibrate(eps, 1e-5, 100))
        noisy = summarize(features, docs, privacy=privacy, secret=b"s", what="alpha")
        again = summarize(features, docs, privacy=privacy, secret=b"s", what="alpha")
        other = summarize(features, docs, privacy=privacy, secret=b"t", what="alpha")
        assert torch.equal(noisy["layers.0.mean"], again["layers.0.mean"])  # deterministic given the secret
        assert not torch.equal(noisy["layers.0.mean"], other["layers.0.mean"])  # unpredictable without it
        errors[eps] = float((noisy["layers.0.mean"] - exact["layers.0.mean"]).norm())
    assert errors[8.0] < errors[0.5]


def test_dp_noise_is_scaled_to_replacing_one_document_and_the_count_is_not_shipped():
    """The first stats_documents documents are summarised, so removing one brings the next in: the noise is
    σ × 2√(2L + 1) (checked on the token count, the first draw of the owner's keyed generator), and the exact
    document count, which a neighbouring dataset changes, is not in what ships."""
    import math

    from flexo.router_stats import REPLACE_ONE, Privacy, _secret_generator, calibrate, summarize

    g = torch.Generator().manual_seed(3)
    features = [torch.randn(6000, HIDDEN, generator=g) for _ in range(LAYERS)]
    docs = torch.arange(6000) // 60
    sigma = calibrate(2.0, 1e-5, 100)
    noisy = summarize(features, docs, privacy=Privacy(2.0, 1e-5, [4.0] * LAYERS, 60, sigma), secret=b"s", what="a")
    z = float(torch.randn(1, generator=_secret_generator(b"s", "a"), dtype=torch.float64))
    assert REPLACE_ONE == 2
    assert int(noisy["tokens"]) == round((6000 / 60 + sigma * 2 * math.sqrt(2 * LAYERS + 1) * z) * 60)
    assert "documents" not in noisy and int(summarize(features, docs)["documents"]) == 100
