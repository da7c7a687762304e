"""Serving with per-request opt-out: a request can exclude owners without a new model folder.

`FlexoServer` loads a merged model once; every request may exclude owners, masked for that request
only (`flexo.routers.runtime_opt_out`, which explains why masking a router logit is the same function
as deleting the expert). Requests are serialised with a lock: the mask changes the model in place.
`FlexoServer.complete` is the token-by-token decoder behind the HTTP server (`flexo serve`,
:mod:`flexo.openai_server`): sampling, stop sequences, echo log-probabilities and per-token attribution.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

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

    supports_opt_out = True

    @property
    def top_k(self) -> int:
        return int(self.model.config.num_experts_per_tok)

    @property
    def positions(self) -> int:
        """The most tokens one sequence may feed the model (its position table)."""
        return int(self.model.config.max_position_embeddings)

    @torch.no_grad()
    def complete(self, ids: Sequence[int], *, exclude: Sequence[str] = (), max_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), logprobs: int | None = None, echo: bool = False,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[dict]:
        """Continue the token ids `ids` token by token (a KV cache, one forward per new token), yielding
        events as they happen:

        - `{"type": "prompt", ...}` first when `echo`: the prompt's tokens, each one's log-probability
          given the tokens before it (None for the first) and, with `logprobs`, its top alternatives;
        - `{"type": "token", "id", "piece", "text", "logprob", "top", "routing"}` per new token: `piece` is
          the token's own text, `text` what this token adds to the returned text (held back while it
          could still become a stop sequence or an incomplete UTF-8 character), `routing` each expert's
          router probability (mean over layers) at the position that produced the token;
        - `{"type": "done", "finish_reason", "text", "attribution", "prompt_tokens", "completion_tokens"}`.

        temperature 0 is greedy; otherwise sampling from softmax(logits / temperature) cut to the top_p
        nucleus, from a generator seeded by `seed` (the same seed, the same text). The text ends at the
        first stop sequence (not included), at EOS, or after `max_tokens` tokens; `cancelled()` is
        polled between tokens (a client that went away). The attribution (as `respond`'s) covers every
        position fed: the prompt's and each new token's but the last."""
        from flexo.attribution import RoutingRecorder, attribution_of

        ids = [int(i) for i in ids]
        if not ids:
            raise FlexoError("cannot continue an empty prompt: pass at least one token")
        if len(ids) + max(max_tokens - 1, 0) > self.positions:
            raise FlexoError(f"a prompt of {len(ids)} tokens plus {max_tokens} new ones exceeds the model's "
                             f"{self.positions} positions: shorten the prompt or lower max_tokens")
        eos = self.tokenizer.eos_token_id
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        stops = [s for s in stop if s]
        names = list(exclude)
        device = self._device()
        with self._lock, self.opt_out(names), RoutingRecorder(self.model, self.experts) as rec:
            out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True)
            captures = [rec.capture()]
            logits = out.logits[0].float().cpu()
            if echo:
                logp = torch.log_softmax(logits[:-1], dim=-1)
                tail = torch.tensor(ids[1:], dtype=torch.long)
                yield {"type": "prompt", "ids": ids, "pieces": [self._piece(i) for i in ids],
                       "logprobs": [None, *logp.gather(1, tail[:, None])[:, 0].tolist()],
                       "top": [None, *(self._top(row, logprobs) for row in logp)] if logprobs is not None else None}
            past, next_logits = out.cache, logits[-1]
            new: list[int] = []
            sent, finish, drawn = "", "length", 0
            for step in range(max_tokens):
                if cancelled():
                    finish = "cancelled"
                    break
                logp = torch.log_softmax(next_logits, dim=-1)
                tok = _choose(next_logits, temperature, top_p, generator)
                drawn += 1
                routing = captures[-1].probs[:, -1, :].mean(dim=0).tolist()
                if tok == eos:
                    finish = "stop"
                    break
                before = self.tokenizer.decode(new, skip_special_tokens=True)
                new.append(tok)
                full = self.tokenizer.decode(new, skip_special_tokens=True)
                cut, hit = _stop_cut(full, stops, final=step == max_tokens - 1)
                yield {"type": "token", "id": tok, "piece": full[len(before):], "text": full[len(sent):cut],
                       "logprob": float(logp[tok]), "top": self._top(logp, logprobs) if logprobs is not None else None,
                       "routing": routing}
                sent = full[:cut]
                if hit:
                    finish = "stop"
                    break
                if step == max_tokens - 1:
                    break  # the last token is returned, never fed
                out = self.model(input_ids=torch.tensor([[tok]], device=device), cache=past, use_cache=True)
                captures.append(rec.capture())
                past, next_logits = out.cache, out.logits[0, -1].float().cpu()
        attribution = attribution_of(_joined(captures), names).to_dict()
        yield {"type": "done", "finish_reason": finish, "text": sent, "attribution": attribution,
               "prompt_tokens": len(ids), "completion_tokens": drawn}

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _top(self, logp: torch.Tensor, k: int) -> dict[str, float]:
        """The k most likely tokens' log-probabilities by their text (the likelier one where texts coincide)."""
        values, index = torch.topk(logp, max(int(k), 1))
        top: dict[str, float] = {}
        for v, i in zip(values.tolist(), index.tolist()):
            top.setdefault(self._piece(i), float(v))
        return top


def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise a draw from the tempered softmax cut to the top_p nucleus (the
    smallest set of most likely tokens whose probability reaches top_p)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=0) - sorted_p  # mass of the likelier tokens
        sorted_p[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _stop_cut(text: str, stops: Sequence[str], *, final: bool) -> tuple[int, bool]:
    """(how much of `text` may be returned now, whether a stop sequence ended it). Text that could still
    grow into a stop sequence, or an incomplete UTF-8 character (U+FFFD at the end), is held back until
    the next token decides — unless this is the final token."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return min(hits), True
    if final:
        return len(text), False
    keep = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    while keep > 0 and text[keep - 1] == "\ufffd":
        keep -= 1
    return keep, False


def _joined(captures):
    from flexo.attribution import RoutingCapture

    return RoutingCapture(captures[0].experts, torch.cat([c.probs for c in captures], dim=1),
                          torch.cat([c.gates for c in captures], dim=1), max(c.top_k for c in captures))


@dataclass
class Response:
    """What a request got back: the generated text or the log-likelihood, and which experts served it."""

    text: str | None
    loglik: float | None
    attribution: dict  # Attribution.to_dict(): prob/gate/top-1 share per expert, overall and per layer
