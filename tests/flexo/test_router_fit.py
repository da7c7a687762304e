"""flexo.router_fit: router rows fitted as classifiers of the router's own input, from statistics alone
(mean and covariance per layer); the statistics checked (count, shapes, finiteness, definiteness, scale)
before any fit, and a fit that cannot route refused."""

from __future__ import annotations

import pytest
import torch

from flexo.errors import FlexoError
from flexo.router_fit import check_stats, check_stats_scale, domain_classifier, feature_stats, fit_router


def _stats(seed: int = 0, n: int = 600, d: int = 8, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return feature_stats([torch.randn(n, d, generator=g) * (i + 1) + i for i in range(layers)])


def test_the_fit_separates_separable_classes():
    # Three Gaussian classes around distinct means sharing a large common part (as hidden states do: the
    # bias-free rows use it as an intercept): the fitted rows classify fresh samples correctly.
    g = torch.Generator().manual_seed(1)
    d = 16
    common = torch.eye(d)[-1] * 8
    means = [common, common + torch.eye(d)[0] * 6, common + torch.eye(d)[1] * 6]
    samples = [m + torch.randn(500, d, generator=g) for m in means]
    stats = [feature_stats([s]) for s in samples]
    rows, figures = fit_router(stats, 1, samples=800, l2=1e-4, steps=200, lr=5e-2, seed=0)
    fresh = [m + torch.randn(300, d, generator=g) for m in means]
    for c, x in enumerate(fresh):
        logits = torch.cat([torch.zeros(len(x), 1), x @ rows[0].T], 1)
        assert (logits.argmax(-1) == c).float().mean() > 0.97, c
    assert min(figures[0]["sample_recall"]) > 0.97



def test_feature_stats_are_the_mean_covariance_and_count():
    g = torch.Generator().manual_seed(2)
    h = [torch.randn(300, 5, generator=g) * 3 + 1, torch.randn(300, 5, generator=g)]
    stats = feature_stats(h)
    assert set(stats) == {"tokens", "layers.0.mean", "layers.0.cov", "layers.1.mean", "layers.1.cov"}
    assert int(stats["tokens"]) == 300 and not stats["tokens"].is_floating_point()
    torch.testing.assert_close(stats["layers.0.mean"], h[0].mean(0))
    centred = h[0].double() - h[0].double().mean(0)
    torch.testing.assert_close(stats["layers.0.cov"], (centred.T @ centred / 299).float())
    assert stats["layers.0.cov"].dtype == torch.float32


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.__setitem__("tokens", torch.tensor([10])), "summarise 10 tokens, at least 100"),
    (lambda s: s.pop("layers.1.cov"), "no layer-1 statistics of width 8"),
    (lambda s: s.__setitem__("layers.0.mean", torch.zeros(4)), "no layer-0 statistics of width 8"),
    (lambda s: s["layers.1.mean"].__setitem__(3, float("inf")), "NaN or Inf"),
    (lambda s: s["layers.0.cov"].__setitem__((0, 1), 5.0), "layer-0 covariance is not symmetric"),
    (lambda s: s.__setitem__("layers.1.cov", -torch.eye(8)), "layer-1 covariance has a negative eigenvalue"),
])
def test_bad_statistics_are_refused_naming_the_layer(edit, words):
    stats = _stats()
    check_stats(stats, 2, 8, "router statistics of 'alpha'", min_tokens=100)  # the unedited ones pass
    edit(stats)
    with pytest.raises(FlexoError, match=words) as e:
        check_stats(stats, 2, 8, "router statistics of 'alpha'", min_tokens=100)
    assert "router statistics of 'alpha'" in str(e.value)


def test_statistics_of_another_scale_are_refused():
    reference = _stats(0)
    check_stats_scale(_stats(1), reference, 2, "beta")  # another sample of the same model: fine
    far = _stats(1)
    far["layers.1.mean"] = far["layers.1.mean"] * 1e4 + 1e4
    with pytest.raises(FlexoError, match="beta: layer-1 mean norm .* outside \\[1/1000, 1000\\]"):
        check_stats_scale(far, reference, 2, "beta")
    tight = _stats(1)
    tight["layers.0.cov"] = tight["layers.0.cov"] * 1e-8
    with pytest.raises(FlexoError, match="beta: layer-0 spread"):
        check_stats_scale(tight, reference, 2, "beta")


def test_a_fit_that_cannot_route_is_refused():
    same = _stats(0, layers=1)
    with pytest.raises(FlexoError, match=r"router fit collapsed at layer 0 .*chance 0.33\): the statistics of "
                                         r"'(public|alpha|beta)' differ most in scale"):
        fit_router([same, same, same], 1, samples=2000, l2=1e-4, steps=30, lr=5e-2, seed=0,
                   names=["public", "alpha", "beta"])


def test_domain_classifier_tells_own_text_from_public():
    g = torch.Generator().manual_seed(3)
    d = 8
    common = torch.eye(d)[-1] * 5  # a shared part the bias-free row uses as an intercept
    own = [common + torch.eye(d)[0] * 6 + torch.randn(400, d, generator=g)]
    public = [common + torch.randn(400, d, generator=g)]
    (w,), (fig,) = domain_classifier(own, public, l2=1e-4, steps=150, lr=5e-2)
    assert w.shape == (d,) and fig["own_recall"] > 0.95 and fig["public_recall"] > 0.95
    assert float((own[0] @ w > 0).float().mean()) == pytest.approx(fig["own_recall"], abs=1e-4)
