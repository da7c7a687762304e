"""Domain-informed routers as classifiers of the router's own input (the biggest lever of #9: docs/ablation.md).

A router row's logit is `r · h`, where `h` is the hidden state the router sees. Trained by the LM loss
alone, an owner's row learns "my expert is better here" — and at our scale an expert trained on extra
text is better almost everywhere, so every owner's row wins on every kind of text and the merged model
sends code to the math expert (measured: docs/ablation.md). Here the rows are fitted as classifiers
of `h` instead, in two places that each keep the data where it is:

- **Owner side, before expert training** (`domain_classifier`): the owner fits a logistic regression
  "own text vs public text" on the public model's router inputs, layer by layer, and uses
  `r_pub + w` as its router row, frozen while the expert trains. Reads: its own text, public text,
  the public model. The expert then learns under the routing it will get.
- **Owner side, after expert training** (`feature_stats`): the owner ships the mean and covariance of
  its own model's router inputs on its own text (per layer: d + d² numbers summarising thousands of
  tokens; never text or token ids).
- **Centre** (`fit_router`): a multinomial logistic regression over all experts, fitted on Gaussian
  samples drawn from those statistics (and from the public model's statistics on public text), with
  r_pub fixed as the reference row. The routers are linear and bias-free, as in the stock model.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from flexo.errors import FlexoError

ROUTER_SUFFIX = "mlp.gate.weight"


def gates(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers]


@torch.no_grad()
def router_inputs(model: torch.nn.Module, blocks: torch.Tensor, *, max_blocks: int, batch_size: int = 16
                  ) -> list[torch.Tensor]:
    """Every layer's router input (fp32, one row per token) for the first `max_blocks` blocks."""
    captured: list[list[torch.Tensor]] = [[] for _ in gates(model)]
    hooks = [g.register_forward_hook(lambda m, inp, out, i=i: captured[i].append(inp[0].reshape(-1, inp[0].shape[-1]).float()))
             for i, g in enumerate(gates(model))]
    model.eval()
    try:
        for i in range(0, min(max_blocks, len(blocks)), batch_size):
            model(input_ids=blocks[i: min(i + batch_size, max_blocks)])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(c) for c in captured]


def _feature_scale(features: Sequence[torch.Tensor]) -> torch.Tensor:
    # L2 is applied to w scaled by the features' spread, so one l2 value suits every layer's norm.
    return torch.cat(list(features)).std(0).mean()


@torch.enable_grad()
def domain_classifier(own: list[torch.Tensor], public: list[torch.Tensor], *, l2: float, steps: int, lr: float
                      ) -> tuple[list[torch.Tensor], list[dict]]:
    """Per layer: w with sigmoid(w·h) ≈ P(own text | h), classes weighted equally, no intercept."""
    weights, figures = [], []
    for own_h, pub_h in zip(own, public):
        x = torch.cat([own_h, pub_h])
        y = torch.cat([torch.ones(len(own_h)), torch.zeros(len(pub_h))])
        sample_w = torch.where(y == 1, 0.5 / len(own_h), 0.5 / len(pub_h))
        scale = _feature_scale([own_h, pub_h])
        w = torch.zeros(x.shape[1], requires_grad=True)
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            bce = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y, reduction="none")
            loss = (bce * sample_w).sum() + l2 * (w * scale).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = (x @ w > 0).float()
            figures.append({"loss": round(float(loss.detach()), 4),
                            "own_recall": round(float(pred[: len(own_h)].mean()), 4),
                            "public_recall": round(float(1 - pred[len(own_h):].mean()), 4),
                            "norm": round(float(w.norm()), 4)})
        weights.append(w.detach())
    return weights, figures


def feature_stats(features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean and covariance (fp64 accumulated, stored fp32) of each layer's router inputs, plus the count."""
    out = {}
    for i, h in enumerate(features):
        h64 = h.double()
        out[f"layers.{i}.mean"] = h64.mean(0).float().contiguous()
        out[f"layers.{i}.cov"] = torch.cov(h64.T).float().contiguous()
    out["tokens"] = torch.tensor([len(features[0])], dtype=torch.long)
    return out


# Statistics whose scale differs from the public model's own (mean norm, or the spread sqrt(trace cov))
# by more than this factor do not describe hidden states of a model built on that public model: they
# would take over the fit (one owner's class swamping every other) or vanish from it.
STATS_SCALE_BOUND = 1e3


def _scales(stats: dict[str, torch.Tensor], layer: int) -> tuple[float, float]:
    mean, cov = stats[f"layers.{layer}.mean"].double(), stats[f"layers.{layer}.cov"].double()
    return float(mean.norm()), float(cov.diagonal().sum().clamp_min(0).sqrt())


def check_stats(stats: dict[str, torch.Tensor], num_layers: int, hidden: int, what: str, *,
                min_tokens: int = 1) -> None:
    """Shapes, finiteness, token count and a symmetric positive semi-definite covariance."""
    tokens = stats.get("tokens")
    if tokens is None or tokens.numel() != 1 or tokens.is_floating_point() or int(tokens) < min_tokens:
        got = None if tokens is None or tokens.numel() != 1 else tokens.item()
        raise FlexoError(f"{what} summarise {got!r} tokens, at least {min_tokens} are needed: rerun its stage with "
                         "more text")
    for i in range(num_layers):
        mean, cov = stats.get(f"layers.{i}.mean"), stats.get(f"layers.{i}.cov")
        if mean is None or cov is None or mean.shape != (hidden,) or cov.shape != (hidden, hidden):
            raise FlexoError(f"{what} has no layer-{i} statistics of width {hidden}: rerun its stage")
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise FlexoError(f"{what} holds NaN or Inf: rerun its stage")
        c = cov.double()
        scale = float(c.abs().max().clamp_min(1e-30))
        if float((c - c.T).abs().max()) > 1e-4 * scale:
            raise FlexoError(f"{what}: the layer-{i} covariance is not symmetric: it is not a covariance; rerun its stage")
        lowest = float(torch.linalg.eigvalsh(c).min())
        if lowest < -1e-4 * scale:
            raise FlexoError(f"{what}: the layer-{i} covariance has a negative eigenvalue ({lowest:.3g}), so it is not "
                             "a covariance (not positive semi-definite); rerun its stage")


def check_stats_scale(stats: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], num_layers: int,
                      what: str) -> None:
    """Per layer, the mean norm and the spread (sqrt of the covariance's trace) within STATS_SCALE_BOUND
    of `reference`'s (the public model's statistics on public text)."""
    for i in range(num_layers):
        (m, s), (m_ref, s_ref) = _scales(stats, i), _scales(reference, i)
        for name, value, ref in (("mean norm", m, m_ref), ("spread", s, s_ref)):
            ratio = value / max(ref, 1e-30)
            if not 1 / STATS_SCALE_BOUND <= ratio <= STATS_SCALE_BOUND:
                raise FlexoError(f"{what}: layer-{i} {name} {value:.3g} is {ratio:.3g}x the public model's "
                                 f"({ref:.3g}), outside [1/{STATS_SCALE_BOUND:g}, {STATS_SCALE_BOUND:g}]: these "
                                 "are not statistics of a model built on this public model; rerun its stage")


def gaussian_samples(mean: torch.Tensor, cov: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    d = mean.numel()
    cov = cov.double() + 1e-4 * torch.eye(d, dtype=torch.float64) * cov.diagonal().mean().clamp_min(1e-6)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info):
        raise FlexoError("a covariance is not positive definite even with jitter: rerun the router statistics")
    z = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return (mean.double() + z @ chol.T).float()


@torch.enable_grad()  # fitted with autograd even when called under no_grad (a server request)
def multinomial_rows(xs: Sequence[torch.Tensor], *, l2: float, steps: int, lr: float) -> tuple[torch.Tensor, dict]:
    """W [C-1, d] of a multinomial logistic regression over the classes of `xs` (one [n_c, d] tensor per
    class, class 0 the reference with W_0 = 0, no intercept), classes weighted equally."""
    scale = _feature_scale(xs)
    w = torch.zeros(len(xs) - 1, xs[0].shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    labels = [torch.full((len(x),), c) for c, x in enumerate(xs)]
    for _ in range(steps):
        loss = l2 * (w * scale).pow(2).sum()
        for x, y in zip(xs, labels):
            logits = torch.cat([torch.zeros(len(x), 1), x @ w.T], 1)
            loss = loss + torch.nn.functional.cross_entropy(logits, y) / len(xs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = w.detach()
    return w, {"loss": round(float(loss.detach()), 4), "sample_recall": class_recall(w, xs)}


def class_recall(w: torch.Tensor, xs: Sequence[torch.Tensor]) -> list[float]:
    """Per class: the share of its rows whose highest logit (reference class 0 at 0) is its own."""
    with torch.no_grad():
        return [round(float((torch.cat([torch.zeros(len(x), 1), x @ w.T], 1).argmax(-1) == c).float().mean()), 4)
                for c, x in enumerate(xs)]


# A fit whose mean class recall (on its own samples) is within this margin of chance (1/C) has not
# learned to route: the rows are (nearly) equal and every token would go to the same experts.
COLLAPSE_MARGIN = 0.05


def fit_router(stats: list[dict[str, torch.Tensor]], num_layers: int, *, samples: int, l2: float, steps: int,
               lr: float, seed: int, names: Sequence[str] | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    """Per layer: W [C-1, d] of a multinomial logistic regression over C classes (class 0 = public, whose
    logit is the reference, W_0 = 0), fitted on `samples` Gaussian draws per class, classes weighted
    equally. Router row of expert c = r_pub + W[c-1]. A fit that collapses is refused, naming the class
    (`names`, public first) whose statistics stand furthest from the others' scale."""
    # One thread: a multi-threaded BLAS may split the sums differently from run to run under load, and
    # the rows (and every opt-out refit) must be the same bytes on every rerun (DVC, exact opt-out).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_router(stats, num_layers, samples=samples, l2=l2, steps=steps, lr=lr, seed=seed, names=names)
    finally:
        torch.set_num_threads(threads)


def _fit_router(stats: list[dict[str, torch.Tensor]], num_layers: int, *, samples: int, l2: float, steps: int,
                lr: float, seed: int, names: Sequence[str] | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    if len(stats) < 2:  # only the public class is left (every owner opted out): no rows to fit
        d = stats[0]["layers.0.mean"].numel() if stats else 0
        return [torch.zeros(0, d) for _ in range(num_layers)], [{"classes": len(stats)} for _ in range(num_layers)]
    g = torch.Generator().manual_seed(seed)
    rows, figures = [], []
    for layer in range(num_layers):
        xs = [gaussian_samples(s[f"layers.{layer}.mean"], s[f"layers.{layer}.cov"], samples, g) for s in stats]
        w, fig = multinomial_rows(xs, l2=l2, steps=steps, lr=lr)
        recall = fig["sample_recall"]
        if sum(recall) / len(recall) <= 1 / len(xs) + COLLAPSE_MARGIN:
            names = list(names or [f"class {c}" for c in range(len(stats))])
            culprit = names[_outlier(stats, layer)]
            # The public class's statistics are computed at the centre from the public model, not shipped.
            fix = ("check the public model (`flexo train-public`)" if culprit == "public"
                   else f"check or rerun `flexo router-update --owner {culprit}`")
            raise FlexoError(f"the router fit collapsed at layer {layer} (class recall {recall}, chance "
                             f"{1 / len(xs):.2f}): the statistics of {culprit!r} differ most in scale from the "
                             f"others'; {fix}")
        rows.append(w)
        figures.append(fig)
    return rows, figures


def _outlier(stats: list[dict[str, torch.Tensor]], layer: int) -> int:
    """The class whose (mean norm, spread) lies furthest, in log scale, from the median of all classes."""
    logs = torch.tensor([[math.log(max(v, 1e-30)) for v in _scales(s, layer)] for s in stats])
    return int((logs - logs.median(0).values).abs().sum(1).argmax())
