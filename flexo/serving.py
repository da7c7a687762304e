"""Serving with per-request opt-out: a request can exclude owners without a new model folder.

`FlexoServer` loads a merged model once; every request may exclude owners, masked for that request
only (`flexo.routers.runtime_opt_out`, which explains why masking a router logit is the same function
as deleting the expert). Requests are serialised with a lock: the mask changes the model in place.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from flexo.errors import FlexoError
from flexo.routers import routers, runtime_opt_out


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
        self._refits: dict[frozenset, list[torch.Tensor]] = {}

    def opt_out(self, exclude: Sequence[str]):
        """The per-request opt-out honouring the model's guarantee: a mask, and for a router-tuned model
        (federated fit) its rows refitted without the excluded owners (computed once per exclusion set)."""
        from flexo.refit import needs_refit, refitted_weights
        from flexo.routers import check_exclusions

        names = check_exclusions(self.experts, exclude, str(self.model_dir))
        weights = None
        if names and needs_refit(self.meta):
            key = frozenset(names)
            if key not in self._refits:
                r_pub = [g.weight[0].detach().clone() for g in routers(self.model)]
                self._refits[key] = refitted_weights(self.model_dir, self.meta, names, r_pub)
            weights = self._refits[key]
        return runtime_opt_out(self.model, self.experts, names, kept_weights=weights)

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
        with self._lock, self.opt_out(exclude):
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
        with self._lock, self.opt_out(exclude):
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
