"""The baselines FlexOlmo is compared with (paper Tables 1–2): a model soup, a BTM ensemble, and routed
variants of both.

**Model soup** (:func:`model_soup`): the uniform (or weighted) average of every expert's FFN — the
public expert and each owner's expert, read from the owner's expert package (or from its 2-expert
model, index 1) — placed as the single expert of a 1-expert model that keeps all other weights
(embeddings, attention, norms, LM head) of the public model. Owners' experts were trained against
that same public model, which is checked through the fingerprint each package records.

**BTM** (:class:`BTMLM`, lm-eval model name ``flexo-btm``): an ensemble of whole models whose
per-token mixture weights are the posterior given the text so far,

    p(x_t | x_<t) = Σ_i w_{i,t} p_i(x_t | x_<t),   w_{·,t} = softmax_i(−NLL_i(x_<t)),

uniform at t = 0. It is the Bayesian model average with a uniform prior, so a document's total
log-likelihood telescopes to logsumexp_i(LL_i) − log n. For `loglikelihood_rolling` each member scores
exactly the rolling windows lm-eval's HF backend uses (`get_rolling_token_windows` +
`make_disjoint_window`, prefix token = BOS/EOS, context_len 1), and "the text so far" is every
earlier token of the document, whichever window scored it: bits-per-byte is comparable with
`HFLM`'s. For `loglikelihood` (multiple-choice tasks) the context is the text so far: the weights of
the first continuation token are the posterior after the context (as it fits in the model's window).
`generate_until` decodes the same mixture greedily, each member on its own KV cache. BTM's top-k
variant (`top_k`, `prefix_tokens`) keeps only the k members with the highest posterior after a prefix.

Members, as flexo's evaluate stage builds it: the public model **and** every owner's own model. The
public model is included so that the ensemble covers the same experts as the merged FlexOlmo model
(public + owners) and has a member that was trained for public text; each owner's model already holds
the public FFN, but mixed with its own expert by a router trained on the owner's text.

**Routed** (:class:`RoutedLM`, ``flexo-routed``): a caller's classifier of a document's first tokens
picks one member for the whole document (the paper's prompt routing), or weights a soup of the
members' FFNs per document (BTM's weighted parameter average). Same windows as the HF backend.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM, TemplateLM
from lm_eval.api.registry import register_model
from safetensors.torch import load_file

from flexo.errors import FlexoError
from flexo.modeling import load_model, new_model, read_meta, with_experts
from flexo.package import PACKAGE_META, PACKAGE_TENSORS, ExpertPackage

# --------------------------------------------------------------------------------------------- soup


def _expert_ffn_from_package(folder: Path, num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(gate_up [2I, H], down [H, I]) per layer] from an expert package."""
    tensors = load_file(str(Path(folder) / PACKAGE_TENSORS))
    out = []
    for i in range(num_layers):
        try:
            gu = torch.cat([tensors[f"layers.{i}.gate_proj"], tensors[f"layers.{i}.up_proj"]], dim=0)
            out.append((gu, tensors[f"layers.{i}.down_proj"]))
        except KeyError as e:
            raise FlexoError(f"expert package {folder} lacks {e.args[0]}: rerun train-expert for it") from None
    return out


def expert_ffn_from_model(model, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.mlp.experts.gate_up_proj[index].detach(), layer.mlp.experts.down_proj[index].detach())
            for layer in model.model.layers]


def _owner_ffn(source: Path, public_fp: str | None, num_layers: int):
    """An owner's expert FFN from its package folder (`expert.safetensors`) or its model folder."""
    source = Path(source)
    if (source / PACKAGE_TENSORS).is_file() and (source / PACKAGE_META).is_file():
        package = ExpertPackage.read(source)
        if public_fp and package.public_fingerprint != public_fp:
            raise FlexoError(
                f"expert package {source} was trained against another public model "
                f"({package.public_fingerprint[:12]}… ≠ {public_fp[:12]}…): retrain it against the current one"
            )
        return _expert_ffn_from_package(source, num_layers)
    model_dir = source / "model" if (source / "model" / "config.json").is_file() else source
    model = load_model(model_dir)
    if model.config.num_experts < 2:
        raise FlexoError(f"{model_dir} has {model.config.num_experts} expert: it is not an owner's 2-expert model")
    if public_fp and (model_dir / "flexo.json").is_file():
        fp = read_meta(model_dir).get("fingerprint")
        if fp and fp != public_fp:
            raise FlexoError(f"{model_dir} was trained against another public model: retrain it")
    return expert_ffn_from_model(model, 1)


def soup_base(public_model):
    """A 1-expert copy of the public model: the frame every soup fills with an averaged FFN."""
    if public_model.config.num_experts != 1:
        raise FlexoError(f"the public model must have 1 expert, it has {public_model.config.num_experts}")
    soup = new_model(with_experts(public_model.config, 1, 1))
    soup.load_state_dict(public_model.state_dict())
    return soup.to(next(public_model.parameters()).device).eval()


@torch.no_grad()
def set_soup_ffn(soup, ffns: Sequence[list[tuple[torch.Tensor, torch.Tensor]]], weights: Sequence[float]):
    """Write Σ_j w_j · FFN_j (weights normalised to sum 1) into the 1-expert `soup` in place; return it.

    In memory and repeatable: a routed weighted soup (:class:`RoutedLM`) rebuilds only this average for
    every document, from FFN lists read once. `ffns`: per source, [(gate_up [2I, H], down [H, I]) per layer].
    """
    weights = [float(x) for x in weights]
    if len(weights) != len(ffns) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise FlexoError(f"soup weights {weights} must be {len(ffns)} non-negative numbers (public first)")
    w = [x / sum(weights) for x in weights]
    for i, layer in enumerate(soup.model.layers):
        gu = sum(wj * f[i][0].float() for wj, f in zip(w, ffns))
        down = sum(wj * f[i][1].float() for wj, f in zip(w, ffns))
        if gu.shape != layer.mlp.experts.gate_up_proj[0].shape or down.shape != layer.mlp.experts.down_proj[0].shape:
            raise FlexoError(f"layer {i}: an expert's FFN shape differs from the public model's: retrain it")
        layer.mlp.experts.gate_up_proj[0].copy_(gu)
        layer.mlp.experts.down_proj[0].copy_(down)
    return soup


@torch.no_grad()
def model_soup(public: Path | Any, experts: Sequence[Path], *, weights: Sequence[float] | None = None):
    """A 1-expert model whose FFN is the average of the public FFN and every owner's expert FFN.

    `public`: the public model folder or a loaded 1-expert model; `experts`: per owner, its expert
    package folder (`models/experts/<owner>`) or its model folder. `weights`: one per FFN (public
    first), normalised to sum 1; default uniform. All non-FFN weights are the public model's.
    """
    if isinstance(public, (str, os.PathLike)):
        public_dir = Path(public)
        public_model = load_model(public_dir)
        public_fp = read_meta(public_dir).get("fingerprint") if (public_dir / "flexo.json").is_file() else None
    else:
        public_model, public_fp = public, None
    if public_model.config.num_experts != 1:
        raise FlexoError(f"the public model must have 1 expert, it has {public_model.config.num_experts}")
    n_layers = public_model.config.num_hidden_layers
    ffns = [expert_ffn_from_model(public_model, 0)] + [_owner_ffn(e, public_fp, n_layers) for e in experts]
    return set_soup_ffn(soup_base(public_model), ffns, [1.0] * len(ffns) if weights is None else weights)


# ---------------------------------------------------------------------------------------------- BTM


def top_members(log_likelihoods: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the `k` members with the highest log-likelihood so far (ties: the earlier member)."""
    keep = torch.zeros(log_likelihoods.shape[0], dtype=torch.bool)
    keep[torch.sort(log_likelihoods.cpu(), descending=True, stable=True).indices[:k]] = True
    return keep.to(log_likelihoods.device)


def mixture_log_weights(member_logprobs: torch.Tensor, *, top_k: int = 0, prefix_tokens: int = 0) -> torch.Tensor:
    """log w_{i,t} = log softmax_i(Σ_{s<t} log p_i(x_s | x_<s)) from [M, T] log-probs (uniform at t = 0).

    `top_k` (0 = all): from t = `prefix_tokens` on, only the `top_k` members with the highest posterior
    at that point keep weight (log w = −inf for the others), renormalised over them and still updated
    token by token.
    """
    lp = member_logprobs.double()
    so_far = torch.cumsum(lp, dim=1) - lp  # log p_i(x_<t): exclusive prefix sums
    if 0 < top_k < lp.shape[0] and prefix_tokens < lp.shape[1]:
        dropped = ~top_members(so_far[:, prefix_tokens], top_k)
        so_far[dropped, prefix_tokens:] = -math.inf
    return so_far - torch.logsumexp(so_far, dim=0, keepdim=True)


def mixture_logprobs(member_logprobs: torch.Tensor, *, top_k: int = 0, prefix_tokens: int = 0) -> torch.Tensor:
    """log p_mix(x_t | x_<t) = log Σ_i w_{i,t} p_i(x_t | x_<t) for t = 0..T−1 from members' [M, T] log-probs.

    w_{·,t} = softmax_i(−NLL_i(x_<t)), uniform at t = 0; float64 throughout. `top_k`, `prefix_tokens`:
    as :func:`mixture_log_weights`.
    """
    log_w = mixture_log_weights(member_logprobs, top_k=top_k, prefix_tokens=prefix_tokens)
    return torch.logsumexp(log_w + member_logprobs.double(), dim=0)


def register_lm(name: str):
    def decorate(cls):
        try:
            register_model(name)(cls)
        except ValueError:  # the module was reloaded: the first class object stays registered
            pass
        return cls

    return decorate


DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF backend's default


class MembersLM(TemplateLM):
    """What BTM and the routed baselines share: member models over one tokenizer, HFLM's tokenisation and
    rolling windows, batched scoring, and greedy decoding of a posterior mixture (one member: plain greedy).

    A subclass says which members answer which request through :meth:`_assign`; everything else (windows,
    truncation, the mixture, stop strings) is here once, so every baseline scores exactly as lm-eval's HF
    backend would.
    """

    kind = "flexo-members"  # the lm-eval model name, for messages
    mix_top_k = 0  # BTM top-k: how many members the mixture keeps after the prefix (0 = all)
    prefix_tokens = 32

    def __init__(self, members: Any, tokenizer: Any, names: Sequence[str] | None, batch_size: int | str,
                 max_length: int | str, device: str | None) -> None:
        super().__init__()
        from flexo.evaluation import default_device, load_tokenizer_for

        if isinstance(members, (str, os.PathLike)):
            members = [m for m in str(members).split(os.pathsep) if m]
        if not members:
            raise FlexoError(f"{self.kind} needs at least one member model")
        self._device = torch.device(device or default_device())
        self.models = []
        first_dir = None
        for m in members:
            if isinstance(m, (str, os.PathLike)):
                first_dir = first_dir or Path(m)
                m = load_model(Path(m))
            self.models.append(m.to(self._device).eval())
        self.names = list(names) if names is not None else [f"member{i}" for i in range(len(self.models))]
        if len(self.names) != len(self.models):
            raise FlexoError(f"{self.kind}: {len(self.names)} names {self.names} for {len(self.models)} members: "
                             "give one name per member")
        if tokenizer is None:
            if first_dir is None:
                raise FlexoError(f"{self.kind} needs a tokenizer for in-memory member models")
            tokenizer = load_tokenizer_for(first_dir)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer_for(Path(tokenizer))
        self.tokenizer = tokenizer
        vocab = {m.config.vocab_size for m in self.models}
        if len(vocab) != 1:
            raise FlexoError(f"{self.kind} members disagree on the vocabulary size {sorted(vocab)}: "
                             "they must share a tokenizer")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_token_id

    # -------------------------------------------------------------------------- tokenisation (as HFLM)
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "flexo").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kw = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **kw)

    # ------------------------------------------------------------------------------ member scoring
    @torch.no_grad()
    def _member_scores(self, windows: list[list[int]], dist_last: Sequence[int] | None = None,
                       models: Sequence[Any] | None = None):
        """For every member (`models`, default all), each window's target log-probs.

        A window is `tokens` (≤ max_length + 1): the model reads tokens[:-1] and is scored on
        tokens[1:]. Returns [member][window] → 1-D float tensor of len(tokens) − 1, and, when
        `dist_last` gives a count per window, [member][window] → log-softmax rows [k, V] of the last k
        positions (for the greedy check).
        """
        models = self.models if models is None else models
        order = sorted(range(len(windows)), key=lambda j: -len(windows[j]))
        lps = [[None] * len(windows) for _ in models]
        dists = [[None] * len(windows) for _ in models] if dist_last is not None else None
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = len(windows[idx[0]]) - 1
            inp = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            tgt = torch.zeros((len(idx), width), dtype=torch.long)
            for r, j in enumerate(idx):
                toks = windows[j]
                inp[r, :len(toks) - 1] = torch.tensor(toks[:-1])
                tgt[r, :len(toks) - 1] = torch.tensor(toks[1:])
            inp, tgt = inp.to(self._device), tgt.to(self._device)
            for mi, model in enumerate(models):
                logp = F.log_softmax(model(inp).logits.float(), dim=-1)  # right padding: causal, unaffected
                picked = logp.gather(-1, tgt[..., None])[..., 0]
                for r, j in enumerate(idx):
                    n = len(windows[j]) - 1
                    lps[mi][j] = picked[r, :n].double().cpu()
                    if dists is not None:
                        k = dist_last[j]
                        dists[mi][j] = logp[r, n - k:n].cpu()
        return lps, dists

    def _assign(self, keys: list[str], route_ids: list[list[int]]):
        """Yield (member models, request indices) groups: which members answer which requests.

        `keys`: each request's text (its document or context), `route_ids`: the tokens a router may read.
        A group must be used before the next is asked for (a routed soup rewrites its model in place).
        """
        yield self.models, list(range(len(keys)))

    def _record_rolling(self, document: str, models: Sequence[Any], member_lp: torch.Tensor) -> None:
        """Called with every document's [members, tokens] log-probs (BTM keeps each member's total)."""

    # ----------------------------------------------------------------------------- lm-eval requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        windows, conts = [], []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise FlexoError(f"{self.kind}: empty context or continuation encoding")
            windows.append((context_enc + continuation_enc)[-(self.max_length + 1):])  # HFLM's left truncation
            conts.append(min(len(continuation_enc), len(windows[-1]) - 1))  # what of it fits in the window
        out: list = [None] * len(requests)
        keys = [req[0][0] if isinstance(req[0], tuple) else str(req[0]) for req in requests]  # the contexts
        for models, rows in self._assign(keys, [req[1] for req in requests]):
            lps, dists = self._member_scores([windows[j] for j in rows], dist_last=[conts[j] for j in rows],
                                             models=models)
            for r, j in enumerate(rows):
                k = conts[j]
                member_lp = torch.stack([lp[r] for lp in lps])  # [M, T]
                # the posterior after the context picks BTM's top-k for the whole continuation
                log_w = mixture_log_weights(member_lp, top_k=self.mix_top_k, prefix_tokens=member_lp.shape[1] - k)
                mix = torch.logsumexp(log_w + member_lp, dim=0)
                # greedy: the mixture's argmax over the vocabulary at each continuation position
                member_dist = torch.stack([d[r] for d in dists]).double()  # [M, k, V]
                mix_dist = torch.logsumexp(log_w[:, -k:, None] + member_dist, dim=0)
                greedy = bool((mix_dist.argmax(-1) == torch.tensor(windows[j][-k:])).all())
                out[j] = (float(mix[-k:].sum()), greedy)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req[0], res)
        return out

    def _windows_of(self, tokens: list[int]) -> list[tuple[list[int], int]]:
        from lm_eval import utils

        pairs = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1))
        return [((ctx + cont)[-(self.max_length + 1):], len(cont)) for ctx, cont in pairs]

    def rolling_windows(self, string: str) -> list[tuple[list[int], int]]:
        """The windows lm-eval's HF backend scores for one document: (tokens, n_scored) pairs.

        HFLM reads (ctx + cont)[-(max_length + 1):][:-1] and scores the last len(cont) positions.
        """
        return self._windows_of(self.tok_encode(string))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [req.args[0] for req in requests]
        tokens = [self.tok_encode(d) for d in docs]
        out: list = [None] * len(requests)
        for models, rows in self._assign(docs, [t[:self.prefix_tokens] for t in tokens]):
            per_doc = [self._windows_of(tokens[j]) for j in rows]
            lps, _ = self._member_scores([w for ws in per_doc for w, _ in ws], models=models)
            first = 0
            for ws, j in zip(per_doc, rows):
                # every token of the document is scored exactly once, in order: the windows' scored tails
                empty = [torch.zeros(0, dtype=torch.float64)]
                member_lp = torch.stack([torch.cat([lp[first + w][-n:] for w, (_, n) in enumerate(ws)] or empty)
                                         for lp in lps])
                first += len(ws)
                self._record_rolling(docs[j], models, member_lp)
                out[j] = float(mixture_logprobs(member_lp, top_k=self.mix_top_k,
                                                prefix_tokens=self.prefix_tokens).sum())
        for req, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # ---------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, as lm-eval's HF backend makes them, one request at a time.

        gen_kwargs as lm-eval passes them: `until` (str or list; the EOS text is added, as HFLM does),
        `max_gen_toks` (default 256) and its aliases, `do_sample`/`temperature` (sampling is refused).
        The context is left-truncated to max_length − max_gen_toks tokens, as HFLM does; where HFLM would
        refuse (max_gen_toks ≥ max_length) at most max_length // 2 tokens are generated instead, so a
        task's long default budget does not cut the prompt to nothing. An empty context is the prefix
        (BOS/EOS) token. The text is cut before the first stop string (HFLM's post-processing).
        """
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), DEFAULT_MAX_GEN_TOKS)
            if kwargs["do_sample"] and float(kwargs["temperature"]) > 0:
                raise FlexoError(f"{self.kind} generation is greedy: got do_sample=True, temperature="
                                 f"{kwargs['temperature']}; set do_sample=False (or temperature=0)")
            until = handle_stop_sequences(list(kwargs["until"]), eos=eos)
            n_new = kwargs["max_gen_toks"] if kwargs["max_gen_toks"] < self.max_length else max(1, self.max_length // 2)
            ids = self.tok_encode(context) or [self.prefix_token_id]
            ((models, _),) = self._assign([context], [ids])
            generated = self._greedy(models, ids, n_new, until, top_k=self.mix_top_k)
            text = postprocess_generated_text(self.tokenizer.decode(generated, skip_special_tokens=True), until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    @torch.no_grad()
    def _greedy(self, models: Sequence[Any], context: list[int], max_new: int, stop: Sequence[str],
                top_k: int = 0) -> list[int]:
        """Greedy decoding of the posterior mixture of `models` after `context`: the generated token ids.

        Each member reads the context once into its own KV cache; the posterior starts from the members'
        likelihoods of the context (its first token unscored: uniform before it), and after each chosen
        token every member's log w grows by its log-prob of that token. `top_k` (0 = all): only the k
        members with the highest posterior after the context run on (the others are dropped, not run).
        Stops at EOS (not returned), after `max_new` tokens, or once a stop string is in the decoded text.
        """
        from transformers import DynamicCache

        if max_new <= 0:
            return []
        inp = torch.tensor([context[-max(1, self.max_length - max_new):]], device=self._device)
        caches = [DynamicCache(config=m.config) for m in models]
        last, loglik = [], []
        for model, cache in zip(models, caches):
            logp = F.log_softmax(model(inp, cache=cache, use_cache=True).logits[0].float(), dim=-1).double()
            loglik.append(logp[:-1].gather(-1, inp[0, 1:, None]).sum())
            last.append(logp[-1])
        loglik = torch.stack(loglik)
        keep = top_members(loglik, top_k) if 0 < top_k < len(models) else torch.ones(len(models), dtype=torch.bool)
        active = [i for i in range(len(models)) if keep[i]]
        generated: list[int] = []
        while True:
            ll = loglik[active]
            mix = torch.logsumexp((ll - torch.logsumexp(ll, 0))[:, None] + torch.stack([last[i] for i in active]), 0)
            token = int(mix.argmax())
            if token == self.eot_token_id:
                return generated
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if len(generated) >= max_new or any(s and s in text for s in stop):
                return generated
            step = torch.tensor([[token]], device=self._device)
            for i in active:
                loglik[i] += last[i][token]
                logits = models[i](step, cache=caches[i], use_cache=True).logits[0, -1]
                last[i] = F.log_softmax(logits.float(), dim=-1).double()


@register_lm("flexo-btm")
class BTMLM(MembersLM):
    """lm-eval model `flexo-btm`: a posterior-weighted ensemble of causal LMs sharing one tokenizer.

    `members`: model folders or loaded models (a string is split on `os.pathsep`, for
    `--model_args members=a:b:c`); `tokenizer`: instance or folder (default: the first member folder's).
    `top_k` (0 = all members; ≥ the number of members = all): BTM's top-k variant, where only the k
    members with the highest posterior after a prefix stay in the mixture — for `loglikelihood_rolling`
    the first `prefix_tokens` tokens of each document, for `loglikelihood` and `generate_until` the
    context. Scoring still runs every member and masks the mixture afterwards (numerically the same as
    running only the k; it keeps `member_rolling` complete); generation stops running the others.
    """

    kind = "flexo-btm"

    def __init__(self, members: Any, tokenizer: Any = None, names: Sequence[str] | None = None,
                 batch_size: int | str = 8, max_length: int | str = 256, device: str | None = None,
                 max_batch_size: int | None = None,  # lm-eval passes it; unused
                 top_k: int | str = 0, prefix_tokens: int | str = 32) -> None:
        if int(top_k) < 0:
            raise FlexoError(f"flexo-btm top_k={top_k} must be ≥ 0 (0 = all members)")
        if int(prefix_tokens) < 0:
            raise FlexoError(f"flexo-btm prefix_tokens={prefix_tokens} must be ≥ 0")
        super().__init__(members, tokenizer, names, batch_size, max_length, device)
        self.top_k, self.prefix_tokens = int(top_k), int(prefix_tokens)
        self.mix_top_k = self.top_k if self.top_k < len(self.models) else 0
        # Every member's own total log-likelihood of each document scored by `loglikelihood_rolling`:
        # the ensemble needs each member's forward pass anyway, so `member_lm(name)` serves the member's
        # own row of a results table from it instead of running the member a second time.
        self.member_rolling: dict[str, dict[str, float]] = {n: {} for n in self.names}
        # ... and every member's per-token log-probs of each document ([M, T], float64): BTM's top-k variant
        # and the routing trace replay them (MixtureReplayLM) without a second pass.
        self.member_tokens: dict[str, torch.Tensor] = {}

    def get_model_info(self) -> dict:
        return {"btm_members": self.names, "btm_max_length": self.max_length, "btm_top_k": self.top_k,
                "btm_prefix_tokens": self.prefix_tokens}

    def _record_rolling(self, document: str, models: Sequence[Any], member_lp: torch.Tensor) -> None:
        for name, lp in zip(self.names, member_lp):
            self.member_rolling[name][document] = float(lp.sum())
        self.member_tokens[document] = member_lp

    def member_lm(self, name: str) -> "MemberReplayLM":
        """An lm-eval model that answers `loglikelihood_rolling` with member `name`'s own totals of the
        documents this ensemble has scored (same windows as lm-eval's HF backend: equal bits-per-byte)."""
        if name not in self.member_rolling:
            raise FlexoError(f"flexo-btm has no member {name!r}: its members are {self.names}")
        return MemberReplayLM(name, self.member_rolling[name])


class MemberReplayLM(LM):
    """One BTM member's document log-likelihoods, recorded during the ensemble's pass, served to lm-eval.

    lm-eval still builds the requests and aggregates bits-per-byte; only the member's forward pass is
    not repeated. A document the ensemble did not score is an error, never a guess.
    """

    def __init__(self, member: str, totals: dict[str, float]) -> None:
        super().__init__()
        self.member, self.totals = member, totals

    def _total(self, document: str) -> float | None:
        return self.totals.get(document)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            total = self._total(req.args[0])
            if total is None:
                raise FlexoError(f"BTM member {self.member!r} has no recorded score for a document of this run: "
                                 "evaluate the ensemble on the same tasks and limit first")
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("a replayed BTM member has document totals only (loglikelihood_rolling)")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("a replayed BTM member has document totals only (loglikelihood_rolling)")

    def get_model_info(self) -> dict:
        return {"replayed_btm_member": self.member}


class MixtureReplayLM(MemberReplayLM):
    """BTM's top-k variant replayed from an all-member BTM pass: each document's total is the top-k mixture
    (:func:`mixture_logprobs`) of the per-token member log-probs BTM recorded (`BTMLM.member_tokens`), the
    same number running only the k members after the prefix would give."""

    def __init__(self, member_tokens: dict[str, torch.Tensor], *, top_k: int, prefix_tokens: int) -> None:
        super().__init__(f"btm-top{top_k}", {})
        self.member_tokens, self.top_k, self.prefix_tokens = member_tokens, int(top_k), int(prefix_tokens)

    def _total(self, document: str) -> float | None:
        lp = self.member_tokens.get(document)
        if lp is None:
            return None
        k = self.top_k if self.top_k < lp.shape[0] else 0
        return float(mixture_logprobs(lp, top_k=k, prefix_tokens=self.prefix_tokens).sum())


def btm_total_loglikelihood(member_totals: Sequence[float]) -> float:
    """The BTM document log-likelihood from the members' totals: logsumexp_i(LL_i) − log n."""
    t = torch.tensor(list(member_totals), dtype=torch.float64)
    return float(torch.logsumexp(t, dim=0) - math.log(len(member_totals)))
