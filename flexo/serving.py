"""Serving with per-request opt-out: a request can exclude owners without a new model folder.

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
requests with different exclusions at the same time: `FlexoServer` serialises requests with a lock.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from flexo.errors import FlexoError
from flexo.params import PUBLIC

_ACTIVE = "_flexo_opt_out_active"


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter

    routers = [m for m in model.modules() if isinstance(m, FlexOlmoTopKRouter)]
    if not routers:
        raise FlexoError(f"{type(model).__name__} has no FlexOlmo routers: runtime opt-out needs a FlexOlmo model")
    return routers


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
                    layers: Sequence[int] | None = None) -> Iterator[torch.nn.Module]:
    """While active, the experts named in `exclude` get router logit -inf in every layer (never chosen,
    weight 0) and each layer keeps top-k = min(k, experts left); on exit the routers are restored exactly.

    `experts` is the model's router order (flexo.json `experts`, public first). Excluding every owner is
    allowed here (the model then computes the public model's function); excluding `public` is not.
    `layers` (decoder layer indices) limits the mask to those layers — a diagnostic (which layer's
    routing matters, bench/routing_ceiling.py); an opt-out masks every layer (None).
    """
    experts = list(experts)
    n = getattr(model.config, "num_experts", None)
    if len(experts) != n:
        raise FlexoError(f"runtime opt-out: {len(experts)} expert names {experts} given for a model with {n} experts")
    names = list(dict.fromkeys(exclude))
    for name in names:
        if name == PUBLIC:
            raise FlexoError("the public expert cannot be excluded (it is expert 0 of every FlexOlmo model)")
        if name not in experts:
            raise FlexoError(f"cannot exclude {name!r}: the model's experts are {experts}")
    if not names:
        yield model
        return
    mask = torch.tensor([e in names for e in experts])
    left = n - int(mask.sum())
    routers = _routers(model)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < len(routers)]
        if bad:
            raise FlexoError(f"runtime opt-out: layers {bad} out of range: the model has layers 0..{len(routers) - 1}")
        routers = [routers[i] for i in dict.fromkeys(layers)]
    if any(getattr(r, _ACTIVE, False) for r in routers):
        raise FlexoError("runtime_opt_out is already active on this model: pass all exclusions in one call")
    saved = []
    try:
        for r in routers:
            saved.append((r, "forward" in r.__dict__, r.__dict__.get("forward")))
            r.forward = _masked_forward(r, mask, min(r.top_k, left))
            setattr(r, _ACTIVE, True)
        yield model
    finally:
        for r, had, fwd in saved:
            if had:
                r.forward = fwd
            else:
                del r.forward
            delattr(r, _ACTIVE)


class FlexoServer:
    """A merged model loaded once; every request may exclude owners (masked per request, no new folder).

        server = FlexoServer("models/merged")
        server.generate("The market", exclude=["news"], max_new_tokens=32)
        server.score("Some text.", exclude=["news"])   # total log-likelihood in nats
    """

    def __init__(self, model_dir: Path | str, *, dtype: torch.dtype = torch.float32):
        from flexo.modeling import load_model, load_tokenizer_from, read_meta

        self.model_dir = Path(model_dir)
        self.meta = read_meta(self.model_dir)
        self.model = load_model(self.model_dir, dtype=dtype)
        self.experts: list[str] = list(self.meta.get("experts") or [])
        if len(self.experts) != self.model.config.num_experts:
            raise FlexoError(f"{self.model_dir}: flexo.json lists {len(self.experts)} experts, the model has "
                             f"{self.model.config.num_experts}: rerun the stage that wrote it")
        self.tokenizer = load_tokenizer_from(self.model_dir)
        self._lock = threading.Lock()

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def respond(self, prompt: str, exclude: Sequence[str] = (), max_new_tokens: int = 32) -> "Response":
        """Greedy continuation of `prompt`, with the attribution of the request as served: the share of
        routing weight each owner's expert received over the prompt and every generated token."""
        from flexo.attribution import recording

        if not isinstance(prompt, str) or not prompt:
            raise FlexoError(f"cannot continue an empty prompt (got {prompt!r}): pass at least one character")
        if max_new_tokens < 1:
            raise FlexoError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self._device())
        max_len = self.model.config.max_position_embeddings
        if ids.shape[1] + max_new_tokens > max_len:
            raise FlexoError(f"a prompt of {ids.shape[1]} tokens plus {max_new_tokens} new ones exceeds the model's "
                             f"{max_len} positions: shorten the prompt")
        with self._lock, runtime_opt_out(self.model, self.experts, exclude):
            with recording(self.model, self.experts, excluded=list(exclude)) as rec:
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return Response(text=text, loglik=None, attribution=rec[0].to_dict())

    def generate(self, prompt: str, exclude: Sequence[str] = (), max_new_tokens: int = 32) -> str:
        """Greedy continuation of `prompt` (the new text only)."""
        return self.respond(prompt, exclude, max_new_tokens).text

    @torch.no_grad()
    def score_request(self, text: str, exclude: Sequence[str] = ()) -> "Response":
        """Total log-likelihood (nats) of `text`'s tokens, each given the ones before it (the first token is
        conditioned on EOS, the document separator the models were trained with), with its attribution."""
        from flexo.attribution import recording

        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise FlexoError("cannot score an empty text: pass at least one character")
        max_len = self.model.config.max_position_embeddings
        if len(ids) + 1 > max_len:
            raise FlexoError(f"text of {len(ids)} tokens is longer than the model's {max_len} positions: split it")
        x = torch.tensor([[self.tokenizer.eos_token_id, *ids]], device=self._device())
        with self._lock, runtime_opt_out(self.model, self.experts, exclude):
            with recording(self.model, self.experts, skip_first=1, excluded=list(exclude)) as rec:
                logits = self.model(input_ids=x).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        return Response(text=None, loglik=float(logp.gather(1, x[0, 1:, None]).sum()), attribution=rec[0].to_dict())

    def score(self, text: str, exclude: Sequence[str] = ()) -> float:
        """Total log-likelihood (nats) of `text` under the model with `exclude` opted out."""
        return self.score_request(text, exclude).loglik


@dataclass
class Response:
    """What a request got back: the generated text or the log-likelihood, and which experts served it."""

    text: str | None
    loglik: float | None
    attribution: dict  # Attribution.to_dict(): prob/gate/top-1 share per expert, overall and per layer
