"""Routed baselines (paper Table 1): prompt routing and BTM's weighted parameter averaging, as the lm-eval
model `flexo-routed` over the same member models BTM mixes (:mod:`flexo.baselines`).

A router (the caller's classifier) reads each document's first tokens (or a prompt's context) and either
sends it to one member (mode "one": the paper's prompt routing) or builds, for it, the soup of the
members' FFNs weighted by the router's probabilities (mode "soup").
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import torch

from flexo.baselines import MembersLM, expert_ffn_from_model, register_lm, set_soup_ffn, soup_base
from flexo.errors import FlexoError

ROUTED_MODES = ("one", "soup")


@register_lm("flexo-routed")
class RoutedLM(MembersLM):
    """lm-eval model `flexo-routed`: each document (or prompt) goes to the member(s) a router picks.

    `route(token_ids) → probabilities over members` is the caller's classifier (a callable, or
    "module:function" to import, for `--model_args`). It reads a document's first `prefix_tokens` tokens
    (`loglikelihood_rolling`) or a prompt's whole context encoding (`loglikelihood`, `generate_until`).

    - mode "one" (the paper's prompt routing): the argmax member scores or generates the whole request,
      with exactly the rolling windows lm-eval's HF backend uses, so its bits-per-byte is HFLM's for the
      documents routed to it.
    - mode "soup" (BTM's weighted parameter averaging): members are [public 1-expert model, owners'
      2-expert models]; each request gets the 1-expert model whose FFN is Σ_j p_j FFN_j (the public FFN,
      then each owner's expert), built as :func:`model_soup` builds it, from FFNs read once.

    `routed`: request text → chosen member index (the argmax in both modes); `route_weights`: → the
    router's normalised probabilities; :meth:`routed_counts` sums them up for a report.
    """

    kind = "flexo-routed"

    def __init__(self, members: Any, route: Callable[[list[int]], torch.Tensor] | str, tokenizer: Any = None,
                 names: Sequence[str] | None = None, batch_size: int | str = 8, max_length: int | str = 256,
                 mode: str = "one", prefix_tokens: int | str = 32, device: str | None = None,
                 max_batch_size: int | None = None) -> None:  # max_batch_size: lm-eval passes it; unused
        if mode not in ROUTED_MODES:
            raise FlexoError(f"flexo-routed mode {mode!r} is not one of {ROUTED_MODES}")
        if int(prefix_tokens) < 1:
            raise FlexoError(f"flexo-routed prefix_tokens={prefix_tokens} must be ≥ 1: the router needs a token")
        if isinstance(route, str):
            route = _import_callable(route)
        if not callable(route):
            raise FlexoError(f"flexo-routed route {route!r} is not callable: pass a function of the token ids")
        super().__init__(members, tokenizer, names, batch_size, max_length, device)
        self.route, self.mode, self.prefix_tokens = route, mode, int(prefix_tokens)
        self.routed: dict[str, int] = {}
        self.route_weights: dict[str, list[float]] = {}
        if mode == "soup":
            self._ffns = self._soup_ffns()
            self.soup = soup_base(self.models[0])

    def _soup_ffns(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The public member's FFN and each owner member's expert FFN, after checking they fit together."""
        public, owners = self.models[0], self.models[1:]
        if public.config.num_experts != 1 or any(m.config.num_experts != 2 for m in owners):
            counts = [m.config.num_experts for m in self.models]
            raise FlexoError(f"flexo-routed soup needs the public 1-expert model first, then owners' 2-expert "
                             f"models; the members have {counts} experts: pass members=[public, *owners]")
        public_ffn = expert_ffn_from_model(public, 0)
        for name, model in zip(self.names[1:], owners):
            shared = expert_ffn_from_model(model, 0)  # an owner's expert 0 is the public FFN, frozen
            if not all(torch.equal(a, b) for pa, pb in zip(shared, public_ffn) for a, b in zip(pa, pb)):
                raise FlexoError(f"flexo-routed member {name!r} was trained against another public model "
                                 "(its expert 0 differs from the public FFN): retrain it or pass its public model")
        return [public_ffn] + [expert_ffn_from_model(m, 1) for m in owners]

    def _weights(self, key: str, ids: list[int]) -> list[float]:
        p = torch.as_tensor(self.route(list(ids)), dtype=torch.float64).detach().flatten().cpu()
        if p.numel() != len(self.models) or not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or p.sum() <= 0:
            raise FlexoError(f"flexo-routed: the router returned {p.tolist()} for {len(self.models)} members: "
                             "it must return one non-negative probability per member")
        self.routed[key] = int(p.argmax())
        self.route_weights[key] = (p / p.sum()).tolist()
        return self.route_weights[key]

    def _assign(self, keys: list[str], route_ids: list[list[int]]):
        weights = [self._weights(k, ids) for k, ids in zip(keys, route_ids)]
        if self.mode == "soup":  # one request at a time: the soup model is rewritten for each
            for j, w in enumerate(weights):
                yield [set_soup_ffn(self.soup, self._ffns, w)], [j]
            return
        for member in sorted({self.routed[k] for k in keys}):
            yield [self.models[member]], [j for j, k in enumerate(keys) if self.routed[k] == member]

    def routed_counts(self) -> dict[str, int]:
        """How many requests went to each member (the argmax of the router's probabilities)."""
        counts = {n: 0 for n in self.names}
        for member in self.routed.values():
            counts[self.names[member]] += 1
        return counts

    def get_model_info(self) -> dict:
        return {"routed_members": self.names, "routed_mode": self.mode, "routed_prefix_tokens": self.prefix_tokens,
                "routed_max_length": self.max_length, "routed_counts": self.routed_counts()}


def _import_callable(spec: str) -> Callable:

    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise FlexoError(f"flexo-routed route {spec!r} cannot be imported ({e}): give it as module:function") from None
