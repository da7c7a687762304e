"""Which owner's expert a text was routed to: routing attribution from the model's own router outputs.

    from flexo.attribution import attribute, attribute_request, routing_table, plot_routing_heatmap

    a = attribute(model, tokenizer, "def f(x): return x", ["public", "code", "math"])
    a.prob_share      # {"public": 0.31, "code": 0.62, "math": 0.07}   (all layers)
    a.layers[0]       # {"prob_share": {...}, "gate_share": {...}, "top1_share": {...}}
    a.to_dict()       # JSON-ready

**Where the numbers come from.** Each layer's router (`mlp.gate`, `FlexOlmoTopKRouter`) returns
`(router_logits, top_k_weights, top_k_index)`. A forward hook on every router records exactly those
outputs while the model runs (the same tensors `output_router_logits=True` collects); nothing here
re-computes the router's linear map. A runtime opt-out (`flexo.routers.runtime_opt_out`) replaces the
router's forward with one that returns the masked logits (−inf) and the masked top-k, and the hook sees
those, so an excluded expert gets exactly 0 under every measure below.

**The three measures** (per expert, per layer, and "all layers" = the mean over layers; every layer sees
the same tokens, so this is also the mean over all (layer, token) pairs):

- `prob_share` — the headline "share of routing weight": the mean over tokens of the expert's full
  softmax probability p_e = softmax(router_logits)_e. It sums to 1 over experts for every token and
  layer, does not depend on top-k, and is the router's own distribution (the quantity FlexOlmo's
  routing analyses plot). Chosen as the headline because it is defined the same way for every model
  (1 expert, 2-expert owner models with top-2 of 2, merged top-k of n) and is continuous in the logits.
- `gate_share` — the share of the FFN mixture actually applied: the top-k weights the router returned
  (FlexOlmo keeps top-k of the softmax *without* renormalisation, so they sum to < 1 when k < n),
  scattered to their experts and renormalised per token to sum to 1. Equal to `prob_share` when
  k = n. Differs from `prob_share` exactly by what the top-k cut drops.
- `top1_share` — the fraction of tokens whose highest-probability expert is that one (ties: the lower
  index, as `argmax`).

Tokens: a text is encoded without special tokens and fed after one EOS token (the document separator
the models were trained with, as lm-eval's rolling loglikelihood and `FlexoServer.score` do). The EOS
position is run but not counted: only the text's own tokens are attributed. Texts longer than the
window are cut into consecutive windows, each after its own EOS.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from flexo.errors import FlexoError
from flexo.routers import check_experts, routers, runtime_opt_out

MEASURES = ("prob_share", "gate_share", "top1_share")
MEASURE_TITLES = {
    "prob_share": "mean router probability",
    "gate_share": "share of applied top-k gate weight",
    "top1_share": "top-1 share (fraction of tokens)",
}
DEFAULT_BATCH = 8


# ----------------------------------------------------------------------------------------- capturing
@dataclass
class RoutingCapture:
    """Per-token routing of some tokens in every layer, from the routers' own outputs.

    probs: [L, N, E] full softmax of the router logits (float32); gates: [L, N, E] the applied top-k
    weights renormalised per token; top_k: the k the routers used (after any runtime opt-out)."""

    experts: list[str]
    probs: torch.Tensor
    gates: torch.Tensor
    top_k: int

    @property
    def tokens(self) -> int:
        return int(self.probs.shape[1])

    @property
    def num_layers(self) -> int:
        return int(self.probs.shape[0])


class RoutingRecorder:
    """A context manager that records what every router returns while it is active.

        with RoutingRecorder(model, experts) as rec:
            model(input_ids)                    # any number of forwards, e.g. `generate` steps
        capture = rec.capture()                 # every routed token, or rec.capture(keep=bool mask)

    It hooks the router modules (`register_forward_hook`), so it also sees a runtime opt-out's masked
    outputs, whichever of the two is entered first."""

    def __init__(self, model: torch.nn.Module, experts: Sequence[str]):
        self.experts = check_experts(model, experts)
        self.routers = routers(model)
        self._raw: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in self.routers]
        self._handles: list = []

    def __enter__(self) -> "RoutingRecorder":
        for i, r in enumerate(self.routers):
            self._handles.append(r.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def hook(module, args, output):
            logits, weights, index = output[0], output[1], output[2]
            self._raw[layer].append((logits.detach(), weights.detach(), index.detach()))

        return hook

    def clear(self) -> None:
        self._raw = [[] for _ in self.routers]

    def capture(self, keep: torch.Tensor | None = None, *, clear: bool = True) -> RoutingCapture:
        """The recorded tokens (those where the flattened bool `keep` is true, in forward order)."""
        n_calls = {len(calls) for calls in self._raw}
        if n_calls == {0}:
            raise FlexoError("no forward pass was recorded: run the model inside the RoutingRecorder block")
        if len(n_calls) != 1:
            raise FlexoError("the routers were called unequally often: a partial forward was recorded")
        probs, gates, ks = [], [], set()
        for calls in self._raw:
            logits = torch.cat([c[0].reshape(-1, c[0].shape[-1]) for c in calls]).float()
            weights = torch.cat([c[1].reshape(-1, c[1].shape[-1]) for c in calls]).float()
            index = torch.cat([c[2].reshape(-1, c[2].shape[-1]) for c in calls])
            ks.add(int(index.shape[-1]))
            if keep is not None:
                k = keep.reshape(-1).to(logits.device)
                if k.shape[0] != logits.shape[0]:
                    raise ValueError(f"keep mask of {k.shape[0]} entries for {logits.shape[0]} routed tokens")
                logits, weights, index = logits[k], weights[k], index[k]
            # The router's own softmax (the same op FlexOlmoTopKRouter applies to its logits): -inf -> 0.
            p = torch.softmax(logits, dim=-1)
            g = torch.zeros_like(p).scatter_add_(1, index.long(), weights)
            g = g / g.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
            probs.append(p.cpu())
            gates.append(g.cpu())
        if clear:
            self.clear()
        return RoutingCapture(self.experts, torch.stack(probs), torch.stack(gates), max(ks))


# --------------------------------------------------------------------------------------------- sums
@dataclass
class _Totals:
    """Running sums over captures: per layer and expert, in float64."""

    experts: list[str]
    layers: int = 0
    tokens: int = 0
    top_k: int = 0
    prob: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    top1: torch.Tensor | None = None

    def add(self, c: RoutingCapture) -> None:
        if self.prob is None:
            L, E = c.num_layers, len(self.experts)
            self.layers = L
            self.prob = torch.zeros(L, E, dtype=torch.float64)
            self.gate = torch.zeros(L, E, dtype=torch.float64)
            self.top1 = torch.zeros(L, E, dtype=torch.float64)
        if c.tokens == 0:
            return
        self.tokens += c.tokens
        self.top_k = max(self.top_k, c.top_k)
        self.prob += c.probs.double().sum(dim=1)
        self.gate += c.gates.double().sum(dim=1)
        hits = torch.nn.functional.one_hot(c.probs.argmax(dim=-1), len(self.experts))
        self.top1 += hits.double().sum(dim=1)

    def shares(self) -> dict:
        """{"prob_share": {...}, "gate_share": {...}, "top1_share": {...}, "layers": [{measure: {...}}]}."""
        if not self.tokens:
            raise FlexoError("nothing to attribute: the text has no tokens")
        per = {"prob_share": self.prob / self.tokens, "gate_share": self.gate / self.tokens,
               "top1_share": self.top1 / self.tokens}
        out = {m: _named(self.experts, t.mean(dim=0)) for m, t in per.items()}
        out["layers"] = [{m: _named(self.experts, t[i]) for m, t in per.items()} for i in range(self.layers)]
        return out


def _named(experts: list[str], values: torch.Tensor) -> dict[str, float]:
    return {e: float(v) for e, v in zip(experts, values.tolist())}


# ------------------------------------------------------------------------------------------ running
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_id(tokenizer) -> int:
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return int(tid)
    raise FlexoError("the tokenizer has no EOS or BOS token to start a sequence with: retrain it with `flexo tokenizer`")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_window(model: torch.nn.Module) -> int:
    """Text tokens per forward: the model's positions less the EOS prefix."""
    return max(1, int(getattr(model.config, "max_position_embeddings", 4096)) - 1)


@torch.no_grad()
def route_sequences(model: torch.nn.Module, recorder: RoutingRecorder, seqs: list[list[int]], *,
                    prefix_id: int, pad_id: int | None = None) -> RoutingCapture:
    """Run `seqs` (token ids, each fed after `prefix_id`) in one right-padded batch; the capture holds
    the text tokens only (no prefix, no padding), sequence by sequence."""
    seqs = [s for s in seqs if s]
    if not seqs:
        raise FlexoError("nothing to attribute: the text has no tokens")
    pad = prefix_id if pad_id is None else int(pad_id)
    width = 1 + max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, 0] = prefix_id
        ids[b, 1 : 1 + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : 1 + len(s)] = 1
    keep = mask.bool().clone()
    keep[:, 0] = False  # the EOS prefix is run, not attributed
    device = _device(model)
    base = getattr(model, "model", model)  # the decoder stack: the routers are there, the LM head is not needed
    recorder.clear()
    base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return recorder.capture(keep)


def _windows(ids: list[int], window: int) -> list[list[int]]:
    return [ids[i : i + window] for i in range(0, len(ids), window)]


def routing_capture(model: torch.nn.Module, tokenizer, text: str, experts: Sequence[str], *,
                    window: int | None = None) -> RoutingCapture:
    """Per-token routing of `text` in every layer (see the module doc for which tokens count)."""
    was_training = model.training
    model.eval()
    try:
        ids = _encode(tokenizer, text)
        if not ids:
            raise FlexoError("nothing to attribute: the text has no tokens")
        w = int(window or default_window(model))
        chunks = _windows(ids, w)
        with RoutingRecorder(model, experts) as rec:
            caps = [route_sequences(model, rec, chunks[i : i + DEFAULT_BATCH], prefix_id=_prefix_id(tokenizer),
                                    pad_id=tokenizer.pad_token_id) for i in range(0, len(chunks), DEFAULT_BATCH)]
    finally:
        model.train(was_training)
    return RoutingCapture(caps[0].experts, torch.cat([c.probs for c in caps], dim=1),
                          torch.cat([c.gates for c in caps], dim=1), max(c.top_k for c in caps))


# --------------------------------------------------------------------------------------- attribution
@dataclass
class Attribution:
    """The routing of one text: each expert's (owner's) share, overall and per layer."""

    experts: list[str]
    tokens: int
    top_k: int
    prob_share: dict[str, float]
    gate_share: dict[str, float]
    top1_share: dict[str, float]
    layers: list[dict[str, dict[str, float]]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    @property
    def dominant(self) -> str:
        """The expert with the largest `prob_share`."""
        return max(self.experts, key=lambda e: self.prob_share[e])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dominant"] = self.dominant
        d["measure"] = "prob_share"
        return d

    def render(self) -> str:
        """A short human table: one row per expert; overall measures, then prob_share per layer."""
        head = (f"{self.tokens} tokens, {len(self.layers)} layers, top-{self.top_k} of {len(self.experts)} experts"
                + (f", excluded: {', '.join(self.excluded)}" if self.excluded else "")
                + f"; dominant: {self.dominant}")
        layer_cols = [f"L{i} prob" for i in range(len(self.layers))] if len(self.layers) <= 8 else []
        cols = ["expert", "prob", "gate", "top-1", *layer_cols]
        rows = []
        for e in self.experts:
            cells = [e + (" (excluded)" if e in self.excluded else ""), f"{self.prob_share[e]:.3f}",
                     f"{self.gate_share[e]:.3f}", f"{self.top1_share[e]:.3f}"]
            if layer_cols:
                cells += [f"{layer['prob_share'][e]:.3f}" for layer in self.layers]
            rows.append(cells)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([head, fmt(cols), *(fmt(r) for r in rows)])


def _attribution(totals: _Totals, excluded: Sequence[str] = ()) -> Attribution:
    s = totals.shares()
    return Attribution(experts=list(totals.experts), tokens=totals.tokens, top_k=totals.top_k,
                       prob_share=s["prob_share"], gate_share=s["gate_share"], top1_share=s["top1_share"],
                       layers=s["layers"], excluded=list(excluded))


def attribution_of(capture: RoutingCapture, excluded: Sequence[str] = ()) -> Attribution:
    totals = _Totals(list(capture.experts))
    totals.add(capture)
    return _attribution(totals, excluded)


def attribute(model: torch.nn.Module, tokenizer, text: str, experts: Sequence[str], *,
              window: int | None = None) -> Attribution:
    """Each expert's share of the routing of `text` (by the names in `experts`, the model's router order).

    Works on any FlexOlmo model: a 1-expert public model (everything is `public`), an owner's 2-expert
    model, a merged model, a strictly opted-out folder (fewer experts: pass its own flexo.json list), and
    a model under `runtime_opt_out` (the masked experts get exactly 0)."""
    return attribution_of(routing_capture(model, tokenizer, text, experts, window=window))


def attribute_request(model: torch.nn.Module, tokenizer, text: str, experts: Sequence[str],
                      exclude: Sequence[str] = (), *, window: int | None = None) -> Attribution:
    """The attribution of a served request: `text` routed with `exclude` masked at run time
    (`flexo.routers.runtime_opt_out`), as the server computes it. Excluded experts are reported
    with share 0. Not re-entrant: do not call it inside another `runtime_opt_out` block on the same
    model (use :func:`attribute` there, which sees the active mask)."""
    names = list(dict.fromkeys(exclude))
    with runtime_opt_out(model, list(experts), names):
        a = attribute(model, tokenizer, text, experts, window=window)
    a.excluded = names
    return a


@contextlib.contextmanager
def recording(model: torch.nn.Module, experts: Sequence[str], *, skip_first: int = 0,
              excluded: Sequence[str] = ()) -> Iterator[list]:
    """Attribute whatever the model routes inside the block (e.g. a `generate` call: the prompt's forward
    and every generated token's). Yields a list that holds one Attribution after the block; the first
    `skip_first` routed tokens (e.g. an EOS prefix) are not counted. Batch size 1, no padding."""
    result: list[Attribution] = []
    with RoutingRecorder(model, experts) as rec:
        yield result
    cap = rec.capture()
    if skip_first:
        cap = RoutingCapture(cap.experts, cap.probs[:, skip_first:], cap.gates[:, skip_first:], cap.top_k)
    result.append(attribution_of(cap, excluded))


# ---------------------------------------------------------------------------------------- per domain
def routing_table(model: torch.nn.Module, tokenizer, texts_by_domain: dict[str, list[str]],
                  experts: Sequence[str], *, max_tokens: int | None = 256,
                  batch_size: int = DEFAULT_BATCH) -> dict:
    """Per domain: each expert's mean router probability, applied gate share and top-1 share, over all
    layers and per layer, over the domain's documents (each truncated to `max_tokens` tokens; None =
    the whole document in windows).

    Returns {"experts", "top_k", "num_layers", "max_tokens", "measure", "domains": {domain: {"documents",
    "tokens", "prob_share", "gate_share", "top1_share", "layers": [{measure: {expert: share}}]}}}."""
    experts = check_experts(model, experts)
    if batch_size < 1:
        raise FlexoError(f"batch_size must be >= 1, got {batch_size}")
    prefix = _prefix_id(tokenizer)
    window = int(max_tokens) if max_tokens else default_window(model)
    was_training = model.training
    model.eval()
    domains, top_k, layers = {}, 0, 0
    try:
        with RoutingRecorder(model, experts) as rec:
            for domain, texts in texts_by_domain.items():
                seqs: list[list[int]] = []
                docs = 0
                for text in texts:
                    ids = _encode(tokenizer, text)
                    if not ids:
                        continue
                    docs += 1
                    seqs += [ids[:window]] if max_tokens else _windows(ids, window)
                if not seqs:
                    raise FlexoError(f"domain {domain!r} has no text to route: check its held-out test split")
                totals = _Totals(experts)
                seqs.sort(key=len)  # similar lengths per batch: little padding
                for i in range(0, len(seqs), batch_size):
                    totals.add(route_sequences(model, rec, seqs[i : i + batch_size], prefix_id=prefix,
                                               pad_id=tokenizer.pad_token_id))
                s = totals.shares()
                top_k, layers = max(top_k, totals.top_k), totals.layers
                domains[domain] = {"documents": docs, "tokens": totals.tokens, **s}
    finally:
        model.train(was_training)
    return {"experts": experts, "top_k": top_k, "num_layers": layers, "max_tokens": max_tokens,
            "measure": "prob_share", "domains": domains}


def render_routing_markdown(table: dict, title: str = "Routing") -> str:
    """Markdown: for each measure a domains × experts table (all layers), then prob_share per layer."""
    experts, domains = table["experts"], list(table["domains"])
    out = [f"# {title}", "",
           f"Experts {', '.join(experts)} (top-{table['top_k']}, {table['num_layers']} layers); held-out test "
           f"documents, up to {table['max_tokens'] or 'all'} tokens each. `prob_share` = mean full-softmax router "
           "probability; `gate_share` = applied top-k weight renormalised per token; `top1_share` = fraction of "
           "tokens whose most probable expert it is. The largest share in each row is in bold.", ""]

    def block(heading: str, rows: dict[str, dict[str, float]], extra: dict[str, str] | None = None) -> None:
        out.append(f"## {heading}")
        out.append("")
        out.append("| domain | " + " | ".join(experts) + (" | tokens |" if extra else " |"))
        out.append("|---|" + "---:|" * (len(experts) + (1 if extra else 0)))
        for d, shares in rows.items():
            best = max(experts, key=lambda e: shares[e])
            cells = [f"**{shares[e]:.3f}**" if e == best else f"{shares[e]:.3f}" for e in experts]
            out.append(f"| {d} | " + " | ".join(cells) + (f" | {extra[d]} |" if extra else " |"))
        out.append("")

    tokens = {d: str(table["domains"][d]["tokens"]) for d in domains}
    for m in MEASURES:
        block(f"{MEASURE_TITLES[m]} (`{m}`), all layers", {d: table["domains"][d][m] for d in domains}, tokens)
    for i in range(table["num_layers"]):
        block(f"layer {i}: {MEASURE_TITLES['prob_share']}",
              {d: table["domains"][d]["layers"][i]["prob_share"] for d in domains})
    return "\n".join(out)


def plot_routing_heatmap(table: dict, path: Path | str, *, title: str | None = None,
                         measures: Sequence[str] = ("prob_share", "top1_share")) -> Path:
    """Heatmaps domains × experts, values written in the cells: one row of panels per measure, one
    panel per layer plus an "all layers" panel first. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flexo.fsutil import atomic_path

    experts, domains = table["experts"], list(table["domains"])
    n_layers = int(table["num_layers"])
    panels = [("all layers", None)] + [(f"layer {i}", i) for i in range(n_layers)]
    cw, ch = 0.75 * len(experts) + 1.2, 0.45 * len(domains) + 1.2
    fig, axes = plt.subplots(len(measures), len(panels), squeeze=False,
                             figsize=(max(4.0, cw * len(panels)), max(2.5, ch * len(measures))))
    image = None
    for r, m in enumerate(measures):
        for c, (name, li) in enumerate(panels):
            ax = axes[r][c]
            src = [table["domains"][d][m] if li is None else table["domains"][d]["layers"][li][m] for d in domains]
            values = [[row[e] for e in experts] for row in src]
            image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            for y, row in enumerate(values):
                for x, v in enumerate(row):
                    ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
            last = r == len(measures) - 1
            ax.set_xticks(range(len(experts)), experts if last else [""] * len(experts), rotation=45,
                          ha="right", fontsize=7)
            ax.set_yticks(range(len(domains)), domains if c == 0 else [""] * len(domains), fontsize=7)
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{m}\n(rows: domain)", fontsize=8)
            if last:
                ax.set_xlabel("expert", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title or f"Routing by domain (top-{table['top_k']} of {len(experts)} experts)", fontsize=9)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path

