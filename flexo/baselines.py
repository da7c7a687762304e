"""The baselines FlexOlmo is compared with (paper Tables 1–2): a model soup and a BTM ensemble.

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

Members, as flexo's evaluate stage builds it: the public model **and** every owner's own model. The
public model is included so that the ensemble covers the same experts as the merged FlexOlmo model
(public + owners) and has a member that was trained for public text; each owner's model already holds
the public FFN, but mixed with its own expert by a router trained on the owner's text.
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


def _expert_ffn_from_model(model, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
    return _expert_ffn_from_model(model, 1)


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
    ffns = [_expert_ffn_from_model(public_model, 0)] + [_owner_ffn(e, public_fp, n_layers) for e in experts]
    if weights is None:
        weights = [1.0] * len(ffns)
    if len(weights) != len(ffns) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise FlexoError(f"soup weights {list(weights)} must be {len(ffns)} non-negative numbers (public first)")
    w = [float(x) / float(sum(weights)) for x in weights]

    soup = new_model(with_experts(public_model.config, 1, 1))
    soup.load_state_dict(public_model.state_dict())
    for i, layer in enumerate(soup.model.layers):
        gu = sum(wj * f[i][0].float() for wj, f in zip(w, ffns))
        down = sum(wj * f[i][1].float() for wj, f in zip(w, ffns))
        if gu.shape != layer.mlp.experts.gate_up_proj[0].shape or down.shape != layer.mlp.experts.down_proj[0].shape:
            raise FlexoError(f"layer {i}: an expert's FFN shape differs from the public model's: retrain it")
        layer.mlp.experts.gate_up_proj[0].copy_(gu)
        layer.mlp.experts.down_proj[0].copy_(down)
    return soup.eval()


# ---------------------------------------------------------------------------------------------- BTM


def mixture_log_weights(member_logprobs: torch.Tensor) -> torch.Tensor:
    """log w_{i,t} = log softmax_i(Σ_{s<t} log p_i(x_s | x_<s)) from [M, T] log-probs (uniform at t = 0)."""
    lp = member_logprobs.double()
    so_far = torch.cumsum(lp, dim=1) - lp  # log p_i(x_<t): exclusive prefix sums
    return so_far - torch.logsumexp(so_far, dim=0, keepdim=True)


def mixture_logprobs(member_logprobs: torch.Tensor) -> torch.Tensor:
    """log p_mix(x_t | x_<t) = log Σ_i w_{i,t} p_i(x_t | x_<t) for t = 0..T−1 from members' [M, T] log-probs.

    w_{·,t} = softmax_i(−NLL_i(x_<t)), uniform at t = 0; float64 throughout.
    """
    return torch.logsumexp(mixture_log_weights(member_logprobs) + member_logprobs.double(), dim=0)


def _register(name: str):
    def decorate(cls):
        try:
            register_model(name)(cls)
        except ValueError:  # the module was reloaded: the first class object stays registered
            pass
        return cls

    return decorate


@_register("flexo-btm")
class BTMLM(TemplateLM):
    """lm-eval model `flexo-btm`: a posterior-weighted ensemble of causal LMs sharing one tokenizer.

    `members`: model folders or loaded models (a string is split on `os.pathsep`, for
    `--model_args members=a:b:c`); `tokenizer`: instance or folder (default: the first member folder's).
    """

    def __init__(self, members: Any, tokenizer: Any = None, names: Sequence[str] | None = None,
                 batch_size: int | str = 8, max_length: int | str = 256, device: str | None = None,
                 max_batch_size: int | None = None) -> None:  # max_batch_size: lm-eval passes it; unused
        super().__init__()
        from flexo.evaluation import default_device, load_tokenizer_for

        if isinstance(members, (str, os.PathLike)):
            members = [m for m in str(members).split(os.pathsep) if m]
        if not members:
            raise FlexoError("flexo-btm needs at least one member model")
        self._device = torch.device(device or default_device())
        self.models = []
        first_dir = None
        for m in members:
            if isinstance(m, (str, os.PathLike)):
                first_dir = first_dir or Path(m)
                m = load_model(Path(m))
            self.models.append(m.to(self._device).eval())
        self.names = list(names) if names is not None else [f"member{i}" for i in range(len(self.models))]
        if tokenizer is None:
            if first_dir is None:
                raise FlexoError("flexo-btm needs a tokenizer for in-memory member models")
            tokenizer = load_tokenizer_for(first_dir)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer_for(Path(tokenizer))
        self.tokenizer = tokenizer
        vocab = {m.config.vocab_size for m in self.models}
        if len(vocab) != 1:
            raise FlexoError(f"flexo-btm members disagree on the vocabulary size {sorted(vocab)}: "
                             "they must share a tokenizer")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_token_id
        # Every member's own total log-likelihood of each document scored by `loglikelihood_rolling`:
        # the ensemble needs each member's forward pass anyway, so `member_lm(name)` serves the member's
        # own row of a results table from it instead of running the member a second time.
        self.member_rolling: dict[str, dict[str, float]] = {n: {} for n in self.names}

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

    def get_model_info(self) -> dict:
        return {"btm_members": self.names, "btm_max_length": self.max_length}

    # ------------------------------------------------------------------------------ member scoring
    @torch.no_grad()
    def _member_scores(self, windows: list[list[int]], dist_last: Sequence[int] | None = None):
        """For every member, each window's target log-probs.

        A window is `tokens` (≤ max_length + 1): the model reads tokens[:-1] and is scored on
        tokens[1:]. Returns [member][window] → 1-D float tensor of len(tokens) − 1, and, when
        `dist_last` gives a count per window, [member][window] → log-softmax rows [k, V] of the last k
        positions (for the greedy check).
        """
        order = sorted(range(len(windows)), key=lambda j: -len(windows[j]))
        lps = [[None] * len(windows) for _ in self.models]
        dists = [[None] * len(windows) for _ in self.models] if dist_last is not None else None
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
            for mi, model in enumerate(self.models):
                logp = F.log_softmax(model(inp).logits.float(), dim=-1)  # right padding: causal, unaffected
                picked = logp.gather(-1, tgt[..., None])[..., 0]
                for r, j in enumerate(idx):
                    n = len(windows[j]) - 1
                    lps[mi][j] = picked[r, :n].double().cpu()
                    if dists is not None:
                        k = dist_last[j]
                        dists[mi][j] = logp[r, n - k:n].cpu()
        return lps, dists

    # ----------------------------------------------------------------------------- lm-eval requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        windows, conts = [], []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise FlexoError("flexo-btm: empty context or continuation encoding")
            toks = (context_enc + continuation_enc)[-(self.max_length + 1):]  # HFLM's left truncation
            windows.append(toks)
            conts.append(len(continuation_enc))
        lps, dists = self._member_scores(windows, dist_last=conts)
        out = []
        for j, k in enumerate(conts):
            members = range(len(self.models))
            member_lp = torch.stack([lps[mi][j] for mi in members])  # [M, T]
            mix = mixture_logprobs(member_lp)
            # greedy: the mixture's argmax over the vocabulary at each continuation position
            log_w = mixture_log_weights(member_lp)[:, -k:]  # [M, k]
            member_dist = torch.stack([dists[mi][j] for mi in members]).double()  # [M, k, V]
            mix_dist = torch.logsumexp(log_w[..., None] + member_dist, dim=0)
            greedy = bool((mix_dist.argmax(-1) == torch.tensor(windows[j][-k:])).all())
            out.append((float(mix[-k:].sum()), greedy))
            self.cache_hook.add_partial("loglikelihood", requests[j][0], out[-1])
        return out

    def rolling_windows(self, string: str) -> list[tuple[list[int], int]]:
        """The windows lm-eval's HF backend scores for one document: (tokens, n_scored) pairs.

        HFLM reads (ctx + cont)[-(max_length + 1):][:-1] and scores the last len(cont) positions.
        """
        from lm_eval import utils

        pairs = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
            token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length, context_len=1))
        return [((ctx + cont)[-(self.max_length + 1):], len(cont)) for ctx, cont in pairs]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        per_doc = [self.rolling_windows(req.args[0]) for req in requests]
        flat = [tokens for ws in per_doc for tokens, _ in ws]
        lps, _ = self._member_scores(flat)
        out, first = [], 0
        for ws, req in zip(per_doc, requests):
            # every token of the document is scored exactly once, in order: the windows' scored tails
            empty = [torch.zeros(0, dtype=torch.float64)]
            member_lp = torch.stack([
                torch.cat([lps[mi][first + w][-n:] for w, (_, n) in enumerate(ws)] or empty)
                for mi in range(len(self.models))
            ])
            first += len(ws)
            for name, lp in zip(self.names, member_lp):
                self.member_rolling[name][req.args[0]] = float(lp.sum())
            total = float(mixture_logprobs(member_lp).sum())
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("flexo-btm scores likelihoods only (perplexity and multiple-choice tasks)")

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

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            total = self.totals.get(req.args[0])
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


def btm_total_loglikelihood(member_totals: Sequence[float]) -> float:
    """The BTM document log-likelihood from the members' totals: logsumexp_i(LL_i) − log n."""
    t = torch.tensor(list(member_totals), dtype=torch.float64)
    return float(torch.logsumexp(t, dim=0) - math.log(len(member_totals)))
