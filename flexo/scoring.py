"""Scoring every model the evaluation compares on some domains' held-out text: the plan, shared by the
owner-side `score@<owner>` stage (its own domain, on its own machine) and the central `evaluate` stage
(the public domain).

The rows (models) are the same wherever they are scored:

- `public`: the public model; `flexolmo`: the merged model (`models/merged`); `flexolmo-rt`: the
  router-tuned one (`models/merged-rt`, when it exists and was tuned);
- with `evaluate.baselines`: `soup` (the average of all expert FFNs in one dense model), `btm` (the
  posterior-weighted ensemble of the public model and every owner's own model, see
  :mod:`flexo.baselines`), `btm-top2` (BTM mixing only the 2 members with the highest posterior after
  the first 32 tokens, replayed from BTM's pass), `prompt-routing` (each document scored entirely by the
  one model — public or an owner's — that a classifier picks from its first 32 tokens: the first router
  layer of the router-tuned model, :func:`first_router`), `soup-weighted` (per document, the soup
  weighted by that classifier's probabilities), `expert:<owner>` (each owner's own 2-expert model, rebuilt from its package
  where its folder is not here), `optout:<owner>` (the merged model with that owner's router logit
  masked to −inf at run time, :func:`flexo.routers.runtime_opt_out`) and `optout-rt:<owner>` (the
  default model opted out as its guarantee says: masked, with the router rows refitted without the
  owner, :mod:`flexo.refit`).

BTM runs first and records each member's own document log-likelihoods; the `public` and `expert:<owner>`
rows replay those (lm-eval still scores them) rather than running each model twice. Each model folder is
loaded once and dropped after its last use (:class:`_ModelCache`).
"""

from __future__ import annotations

import contextlib
import gc
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from flexo.errors import FlexoError
from flexo.evaluation import default_device, evaluate_model
from flexo.layout import Layout
from flexo.params import PUBLIC, Params


def model_file_name(name: str) -> str:
    """`expert:code` → `expert-code` (a file name without ':')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def owner_model_path(layout: Layout, owner: str) -> Path:
    """The owner's model folder where it exists, else its package folder (rebuilt from the public model)."""
    model = layout.expert(owner) / "model"
    if (model / "config.json").is_file():
        return model
    if not (layout.expert(owner) / "expert.json").is_file():
        raise FlexoError(f"no model or expert package of owner {owner!r} in {layout.expert(owner)}: run "
                         f"`flexo train-expert --owner {owner}` (or receive its published package) first")
    return layout.expert(owner)


def load_owner_model(public_model: Path, path: Path):
    """An owner's model from `owner_model_path`: its folder, or rebuilt from its package on the public model."""
    from flexo.modeling import load_model, owner_model_from_package

    path = Path(path)
    return load_model(path) if (path / "config.json").is_file() else owner_model_from_package(public_model, path)


def require_model(path: Path, what: str, stage: str) -> Path:
    if not (Path(path) / "config.json").is_file():
        raise FlexoError(f"no {what} in {path}: run `flexo {stage}` first")
    return Path(path)


# ------------------------------------------------------------------------------------------- the plan
class _Job:
    """One row of the table: a name and how to get an evaluable object (model or lm-eval LM)."""

    def __init__(self, name: str, make: Callable[[], contextlib.AbstractContextManager]):
        self.name, self.make = name, make


def _plan(params: Params, layout: Layout, tokenizer: Callable[[], Any], cache: "_ModelCache") -> list[_Job]:
    from flexo.modeling import read_meta

    merged = require_model(layout.merged, "merged model", "merge")
    # BTM runs every member (public + each owner's model) over every document anyway; it records each
    # member's own document totals, and the `public` and `expert:*` rows are served from them (lm-eval
    # still builds the requests and computes bits-per-byte) instead of a second forward pass per model.
    btm_members: dict[str, dict[str, float]] = {}
    btm_tokens: dict[str, Any] = {}  # document → every member's per-token log-probs (BTM top-k replays them)

    def member(name: str, path: Path):
        @contextlib.contextmanager
        def make():
            if name in btm_members:
                from flexo.baselines import MemberReplayLM

                yield MemberReplayLM(name, btm_members[name])
            else:
                with cache.use(path) as model:
                    yield model
        return make

    jobs = [_Job("public", member(PUBLIC, layout.public_model)),
            _Job("flexolmo", lambda: cache.use(merged))]
    rt = layout.merged_rt
    if (rt / "config.json").is_file() and (rt / "flexo.json").is_file() and read_meta(rt).get("tuned", True) is not False:
        jobs.append(_Job("flexolmo-rt", lambda: cache.use(rt)))
    if not params.evaluate.baselines:
        return jobs

    # An owner's own model: its folder where the owner trained here, else rebuilt from the public model and
    # the owner's package (the same weights: everything but the package is the public model, bit for bit).
    expert_models = {o: owner_model_path(layout, o) for o in params.owners}

    @contextlib.contextmanager
    def soup():
        from flexo.baselines import model_soup

        yield model_soup(layout.public_model, [layout.expert(o) for o in params.owners]).to(default_device())

    @contextlib.contextmanager
    def btm():
        from flexo.baselines import BTMLM

        with contextlib.ExitStack() as stack:
            members = [stack.enter_context(cache.use(p)) for p in [layout.public_model, *expert_models.values()]]
            lm = BTMLM(members, tokenizer=tokenizer(), names=[PUBLIC, *params.owners],
                       batch_size=params.evaluate.batch_size, max_length=params.evaluate.max_length)
            yield lm
            btm_members.update(lm.member_rolling)
            btm_tokens.update(lm.member_tokens)

    @contextlib.contextmanager
    def btm_top2():
        """BTM top-2 (the BTM paper's variant): after the first 32 tokens only the 2 members with the highest
        posterior are mixed. Replayed from BTM's per-token member log-probs: no model runs again."""
        from flexo.baselines import MixtureReplayLM

        yield MixtureReplayLM(btm_tokens, top_k=2, prefix_tokens=32)

    # Prompt routing and the weighted soup need a classifier over {public, owners} that saw no owner's text:
    # the router-tuned model's first router (fitted on the owners' shipped statistics, :mod:`flexo.refit`), or
    # the plain merge's, averaged over a document's first tokens.
    router_folder = rt if (rt / "config.json").is_file() and any(j.name == "flexolmo-rt" for j in jobs) else merged

    def routed(mode: str):
        @contextlib.contextmanager
        def make():
            from flexo.routed import RoutedLM

            with contextlib.ExitStack() as stack:
                classifier = stack.enter_context(cache.use(router_folder))
                members = [stack.enter_context(cache.use(p)) for p in [layout.public_model, *expert_models.values()]]
                tok = tokenizer()
                prefix = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
                yield RoutedLM(members, first_router(classifier, list(read_meta(router_folder)["experts"]), prefix),
                               tokenizer=tok, names=[PUBLIC, *params.owners], mode=mode,
                               batch_size=params.evaluate.batch_size, max_length=params.evaluate.max_length)
        return make

    def optout(owner: str, folder: Path):
        """The model in `folder` with `owner` opted out as its guarantee says: masked (the plain merge), or
        masked with the router rows refitted without the owner (the federated-tuned default model)."""
        @contextlib.contextmanager
        def make():
            from flexo.refit import needs_refit, refitted_weights
            from flexo.routers import routers, runtime_opt_out

            meta = read_meta(folder)
            experts = list(meta.get("experts") or [])
            if owner not in experts:
                raise FlexoError(f"owner {owner!r} is not an expert of {folder} ({experts}): rerun `flexo merge`")
            with cache.use(folder) as model:
                weights = None
                if needs_refit(meta):
                    weights = refitted_weights(folder, meta, [owner], [g.weight[0].detach().clone() for g in routers(model)])
                with runtime_opt_out(model, experts, [owner], kept_weights=weights):
                    yield model
        return make

    jobs += [_Job("soup", soup), _Job("soup-weighted", routed("soup")), _Job("btm", btm), _Job("btm-top2", btm_top2),
             _Job("prompt-routing", routed("one"))]
    jobs += [_Job(f"expert:{o}", member(o, p)) for o, p in expert_models.items()]
    jobs += [_Job(f"optout:{o}", optout(o, merged)) for o in params.owners]
    if any(j.name == "flexolmo-rt" for j in jobs):  # the default model's opt-outs, exact
        jobs += [_Job(f"optout-rt:{o}", optout(o, rt)) for o in params.owners]
    return jobs


# Run order (not table order): each model folder is loaded once and dropped after its last use. BTM
# goes first: the public and owners' models live only while it runs, and their own rows (`public`,
# `expert:*`) replay its passes; the merged model lives from `flexolmo` through the opt-outs.
_RUN_ORDER = ("btm", "btm-top2", "prompt-routing", "soup-weighted", "public", "expert:", "soup", "flexolmo", "optout:", "flexolmo-rt", "optout-rt:")


def _run_order(job: _Job) -> int:
    if job.name in _RUN_ORDER:
        return _RUN_ORDER.index(job.name)
    return next(i for i, p in enumerate(_RUN_ORDER) if p.endswith(":") and job.name.startswith(p))


class _ModelCache:
    """Loads each model folder once and keeps it while a later job of the plan still needs it."""

    def __init__(self, public_model: Path):
        self.public_model = Path(public_model)  # what an owner's model is rebuilt on from its package
        self.models: dict[Path, Any] = {}
        self.pending: dict[Path, int] = {}

    def expect(self, path: Path, times: int = 1) -> None:
        self.pending[Path(path)] = self.pending.get(Path(path), 0) + times

    @contextlib.contextmanager
    def use(self, path: Path) -> Iterator[Any]:
        path = Path(path)
        if path not in self.models:
            # a model folder, or an expert package without the owner's model folder (a central machine)
            self.models[path] = load_owner_model(self.public_model, path).to(default_device())
        try:
            yield self.models[path]
        finally:
            self.pending[path] = self.pending.get(path, 1) - 1
            if self.pending[path] <= 0:
                self.models.pop(path, None)
                gc.collect()


def _count_uses(params: Params, layout: Layout, cache: _ModelCache, jobs: list[_Job]) -> None:
    names = [j.name for j in jobs]
    # With BTM in the plan, the members' own rows replay its passes and load nothing.
    routed = sum(n in ("prompt-routing", "soup-weighted") for n in names)  # each holds the members and a router
    cache.expect(layout.public_model, 1 + routed)
    cache.expect(layout.merged, int("flexolmo" in names) + sum(n.startswith("optout:") for n in names))
    if "flexolmo-rt" in names:
        cache.expect(layout.merged_rt, 1 + sum(n.startswith("optout-rt:") for n in names))
    router = layout.merged_rt if (layout.merged_rt / "config.json").is_file() and "flexolmo-rt" in names else layout.merged
    cache.expect(router, routed)
    for o in params.owners:
        cache.expect(owner_model_path(layout, o), int("btm" in names or f"expert:{o}" in names) + routed)


def score_models(params: Params, layout: Layout, domains: list[str], *, limit: int | None, tokenizer,
                 write_tasks: Callable[[], Path], raw_dir: Path | None = None,
                 replicates: dict[str, dict[str, list[float]]] | None = None, only: Sequence[str] | None = None
                 ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Bits per byte of every row of the plan on `domains` ({model: {domain: bpb}}, in table order) and the
    seconds each row took. `write_tasks()` writes the lm-eval task folder (called once every input has been
    checked, so a refusal leaves nothing behind); with `raw_dir`, lm-eval's raw results of each row go there;
    `replicates`, when given, is filled with {model: {domain: bootstrap replicates of its bits per byte}}
    (flexo.intervals: the same resampled documents for every model, so any two rows pair); `only` keeps those
    rows of the plan (the mixed-domain suite scores the headline rows, not every opt-out)."""
    from flexo.intervals import replicates as bootstrap
    from tqdm.auto import tqdm

    require_model(layout.public_model, "public model", "train-public")
    cache = _ModelCache(layout.public_model)
    jobs = _plan(params, layout, lambda: tokenizer, cache)  # checks every input before anything is written
    if only is not None:
        jobs = [j for j in jobs if j.name in only]
    _count_uses(params, layout, cache, jobs)
    tasks_dir = write_tasks()
    ev = params.evaluate
    bpb: dict[str, dict[str, float]] = {}
    eval_s: dict[str, float] = {}
    bar = tqdm(sorted(jobs, key=_run_order), desc=f"score {', '.join(domains)}", unit="model")
    for job in bar:
        bar.set_postfix_str(job.name)
        t0 = time.time()
        documents: dict[str, list] | None = {} if replicates is not None else None
        with job.make() as obj:
            scores = evaluate_model(obj, tokenizer, tasks_dir, limit=limit, batch_size=ev.batch_size,
                                    max_length=ev.max_length, domains=domains, documents=documents,
                                    raw_out=raw_dir / f"{model_file_name(job.name)}.json" if raw_dir else None)
        if replicates is not None:
            replicates[job.name] = {d: bootstrap(docs) for d, docs in documents.items()}
        bpb[job.name] = {d: round(scores[d], 6) for d in domains}
        eval_s[job.name] = round(time.time() - t0, 1)
        bar.write(f"{job.name}: " + ", ".join(f"{d} {v:.3f}" for d, v in bpb[job.name].items())
                  + f" ({eval_s[job.name]:.0f}s)")
    order = [j.name for j in jobs]  # back to the plan's (table) order
    return {m: bpb[m] for m in order}, {m: eval_s[m] for m in order}


def first_router(model, experts: list[str], prefix_id: int) -> Callable[[list[int]], Any]:
    """A document classifier over the model's experts (public first, then the owners): the mean over the
    document's tokens (read after `prefix_id`, as every rolling window starts) of its first layer's router
    probabilities. That layer's router reads the public model's features (embeddings and the first
    attention block are the public model's), so this is the paper's prompt routing with a classifier
    fitted without any owner's text."""
    from flexo.attribution import RoutingRecorder, route_sequences

    def route(ids: list[int]):
        with RoutingRecorder(model, experts) as rec:
            return route_sequences(model, rec, [list(ids)], prefix_id=prefix_id).probs[0].mean(dim=0)
    return route


def routed_models(params: Params, layout: Layout, rows: list[str]) -> dict[str, Path]:
    """The models of the routing analysis: every evaluated row that is one model folder with experts."""
    routed = {"flexolmo": layout.merged, **{f"expert:{o}": owner_model_path(layout, o) for o in params.owners}}
    if "flexolmo-rt" in rows:
        routed["flexolmo-rt"] = layout.merged_rt
    return routed


def model_fingerprints(params: Params, layout: Layout) -> dict[str, str]:
    """What a set of scores is bound to: the public model's and each package's fingerprints (from their
    manifests) and the merged models' tensor hashes. Scores for other models are stale."""
    from flexo.modeling import fingerprint, read_meta
    from flexo.package import ExpertPackage

    out = {PUBLIC: str(read_meta(layout.public_model).get("fingerprint"))}
    for o in params.owners:
        if (layout.expert(o) / "expert.json").is_file():
            out[f"package:{o}"] = ExpertPackage.read(layout.expert(o), owner=o).tensors_sha256
    for name, folder in (("merged", layout.merged), ("merged-rt", layout.merged_rt)):
        if (folder / "config.json").is_file():
            out[name] = fingerprint(folder)
    return out


# --------------------------------------------------------------------------------- shipped scores
SCORES_FORMAT = "flexo-scores-v2"  # v2: paired bootstrap replicates per model


def effective_limit(params: Params, limit: int | None) -> int | None:
    value = params.evaluate.limit if limit is None else int(limit)
    if not 0 <= value <= 10**9:
        raise FlexoError(f"--limit must be between 0 (every document) and 1000000000, got {value}")
    return value or None


def read_scores(layout: Layout, owner: str, *, rows: list[str], fingerprints: dict[str, str], limit: int | None,
                max_length: int) -> dict | None:
    """An owner's shipped scores (`results/scores/<owner>.json`), checked to be for these models and settings
    and to hold every row; None when the owner has shipped none (its domain is then left out)."""
    from flexo.fsutil import read_json

    path = layout.scores(owner)
    if not path.is_file():
        return None
    fix = f"rerun `flexo score --owner {owner}` on {owner}'s machine (or receive its newer scores)"
    rec = read_json(path, what=f"{owner}'s scores")
    if not isinstance(rec, dict) or rec.get("format") != SCORES_FORMAT or rec.get("owner") != owner:
        raise FlexoError(f"{path} is not {owner}'s scores ({SCORES_FORMAT}): {fix}")
    if rec.get("fingerprints") != fingerprints:
        stale = sorted(k for k in {*fingerprints, *(rec.get("fingerprints") or {})}
                       if (rec.get("fingerprints") or {}).get(k) != fingerprints.get(k))
        raise FlexoError(f"{path} scored other models than these ({', '.join(stale)} differ): {fix}")
    if rec.get("limit") != (limit or 0) or rec.get("max_length") != max_length:
        raise FlexoError(f"{path} was scored with limit {rec.get('limit')} and max_length {rec.get('max_length')}, "
                         f"not {limit or 0} and {max_length}: {fix}")
    bpb = rec.get("bpb") or {}
    missing = [m for m in rows if m not in bpb]
    bad = [m for m in rows if m in bpb and not (isinstance(bpb[m], (int, float)) and 0 < bpb[m] < 1e3)]
    if missing or bad:
        raise FlexoError(f"{path} lacks rows {missing} or has unusable values for {bad}: {fix}")
    reps = rec.get("bootstrap") or {}
    lengths = {len(reps.get(m) or []) for m in rows}
    if len(lengths) != 1 or 0 in lengths:
        raise FlexoError(f"{path} lacks the bootstrap replicates of some rows: {fix}")
    return rec
