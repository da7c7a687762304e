"""FlexOlmo routers: finding them in a model, checking expert names, and per-request opt-out.

**Why masking is deletion.** A FlexOlmo layer routes a token by p = softmax(W_r h) over all E experts,
keeps the top-k entries of p and does *not* renormalise them (`norm_topk_prob=False`); the layer output
is sum over the kept experts e of p_e · FFN_e(h). Setting the logits of the excluded experts to -inf
gives them p = 0 and leaves every other p_e = exp(l_e) / sum over the remaining experts of exp(l_j) —
exactly the softmax the model without those experts (rows deleted) computes. The top-k of the masked
p, with k ≤ experts left, then picks the same experts with the same weights as top-k in the smaller
model, so `runtime_opt_out(model, experts, ["x"])` and `flexo opt-out --exclude x` compute the same
function (equal up to float rounding of the router matmul). With renormalisation (norm_topk_prob=True)
the same would hold; with a router bias or a load-balancing re-weighting it need not.

`runtime_opt_out` wraps each layer's router (`mlp.gate`) forward for the duration of a `with` block and
restores it exactly on exit. It changes the model object in place, so one model must not serve two
requests with different exclusions at the same time (`flexo.serving.FlexoServer` serialises requests).
Used by serving, attribution and the evaluation's opt-out rows alike.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from flexo.errors import FlexoError
from flexo.params import PUBLIC


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every layer's FlexOlmo router (`FlexOlmoTopKRouter`), in layer order."""
    from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter

    found = [m for m in model.modules() if isinstance(m, FlexOlmoTopKRouter)]
    if not found:
        raise FlexoError(f"{type(model).__name__} has no FlexOlmo routers: this needs a FlexOlmo model")
    return found


def check_experts(model: torch.nn.Module, experts: Sequence[str]) -> list[str]:
    """`experts` (flexo.json's router order) fit the model: one distinct name per expert."""
    experts = list(experts)
    n = getattr(model.config, "num_experts", None)
    if len(experts) != n:
        raise FlexoError(f"{len(experts)} expert names {experts} given for a model with {n} experts: "
                         "pass the `experts` list of the model's flexo.json")
    if len(set(experts)) != len(experts):
        raise FlexoError(f"expert names {experts} repeat a name: pass the `experts` list of the model's flexo.json")
    return experts


def check_exclusions(experts: Sequence[str], exclude: Sequence[str], where: str = "the model") -> list[str]:
    """The owners to exclude, in order and without repeats; `public` and unknown names are refused."""
    names = list(dict.fromkeys(exclude))
    for name in names:
        if name == PUBLIC:
            raise FlexoError("the public expert cannot be excluded (it is expert 0 of every FlexOlmo model)")
        if name not in experts:
            raise FlexoError(f"cannot exclude {name!r}: the experts of {where} are {list(experts)}")
    return names


_ACTIVE = "_flexo_opt_out_active"  # set on a router while its forward is masked


def _masked_forward(router: torch.nn.Module, mask: torch.Tensor, top_k: int):
    """FlexOlmoTopKRouter.forward with the excluded logits at -inf and top-k ≤ experts left."""

    def forward(hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        router_logits = F.linear(hidden_states, router.weight)
        router_logits = router_logits.masked_fill(mask.to(router_logits.device), float("-inf"))
        router_probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(router_probs, top_k, dim=-1)
        if router.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), top_index

    return forward


@contextlib.contextmanager
def runtime_opt_out(model: torch.nn.Module, experts: list[str], exclude: Sequence[str],
                    layers: Sequence[int] | None = None,
                    kept_weights: Sequence[torch.Tensor] | None = None) -> Iterator[torch.nn.Module]:
    """While active, the experts named in `exclude` get router logit -inf in every layer (never chosen,
    weight 0) and each layer keeps top-k = min(k, experts left); on exit the routers are restored exactly.

    `experts` is the model's router order (flexo.json `experts`, public first). Excluding every owner is
    allowed here (the model then computes the public model's function); excluding `public` is not.
    `layers` (decoder layer indices) limits the mask to those layers — a diagnostic (which layer's
    routing matters, experiments/routing_ceiling.py); an opt-out masks every layer (None).
    `kept_weights` (per layer, [experts kept, h]) replaces the kept experts' router rows while the block
    runs: a router-tuned model's rows refitted without the excluded owners (flexo.refit), which makes the
    masked model exactly the refitted model.
    """
    experts = list(experts)
    n = getattr(model.config, "num_experts", None)
    if len(experts) != n:
        raise FlexoError(f"runtime opt-out: {len(experts)} expert names {experts} given for a model with {n} experts")
    names = check_exclusions(experts, exclude)
    if not names:
        yield model
        return
    mask = torch.tensor([e in names for e in experts])
    left = n - int(mask.sum())
    layer_routers = routers(model)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < len(layer_routers)]
        if bad:
            raise FlexoError(f"runtime opt-out: layers {bad} out of range: the model has layers 0..{len(layer_routers) - 1}")
        layer_routers = [layer_routers[i] for i in dict.fromkeys(layers)]
    if any(getattr(r, _ACTIVE, False) for r in layer_routers):
        raise FlexoError("runtime_opt_out is already active on this model: pass all exclusions in one call")
    if kept_weights is not None and (layers is not None or len(kept_weights) != len(layer_routers)):
        raise FlexoError(f"runtime opt-out: {len(kept_weights)} refitted router weights for {len(layer_routers)} layers")
    kept = (~mask).nonzero().flatten()
    saved = []
    try:
        for i, r in enumerate(layer_routers):
            saved.append((r, "forward" in r.__dict__, r.__dict__.get("forward"), r.weight.detach().clone()))
            if kept_weights is not None:
                with torch.no_grad():
                    r.weight[kept] = kept_weights[i].to(r.weight.dtype).to(r.weight.device)
            r.forward = _masked_forward(r, mask, min(r.top_k, left))
            setattr(r, _ACTIVE, True)
        yield model
    finally:
        for r, had, fwd, weight in saved:
            with torch.no_grad():
                r.weight.copy_(weight)
            if had:
                r.forward = fwd
            else:
                del r.forward
            delattr(r, _ACTIVE)
