"""Stage `audit-extraction` (`audit@<owner>`): what do the models reveal about an owner's training text?

    flexo audit-extraction --owner math [--documents N] [--prefix-tokens P] [--continuation-tokens C]
                           [--samples S] [--threshold T] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                           [--batch-size B] [--membership-documents M]

Every setting comes from params.yaml's `audit:` section; a flag overrides it for one run. Two tests,
each on every model, run where the owner's data is:

**Data extraction** (FlexOlmo §5.3), in the style of Carlini et al.: sample `--documents` documents
(seeded) from the owner's train split, give each model the first `--prefix-tokens` tokens of a document,
sample `--continuation-tokens` tokens, and count the document as **extracted** when the generated
continuation is within normalised edit distance of the true one: similarity = 1 − Levenshtein(generated,
true) / max(len(generated), len(true)), on **characters** of the decoded texts (tokenizer-independent),
≥ `--threshold` (0.9). With `--samples` > 1 a document counts when any of its samples does.
Decoding is plain temperature sampling (temperature 1.0) restricted to the 50 most likely tokens
(top-k 50, the common default of such extraction tests) with nucleus sampling off (top-p 1.0);
temperature 0 is greedy decoding. The paper's exact decoding settings are not restated here: every
setting is a flag and is written into the result. The random stream is seeded per model with the same
seed, so the models differ only by what they predict. The paper reports 0.1 % (public), 1.6 % (a dense
math expert) and 0.7 % (FlexOlmo).

**Loss-based membership inference** (Yeom et al. 2018; `flexo.membership`): can a model's loss tell the
owner's train documents from its held-out ones? `--membership-documents` train documents and as many
held-out (test-split) documents, both sampled with `--seed` (fewer, the same number on each side, when
the test split is smaller), are scored by the mean per-token NLL of their first `model.max_seq_len`
tokens (after an EOS, as in training); the result is the ROC AUC of "lower loss ⇒ member" (Mann–Whitney,
ties 1/2) with a seeded 95 % bootstrap interval over documents. 0.5 = the model does not tell them apart.
The public model never saw the owner's text: its AUC is the baseline (what the two samples' own difference,
and chance on a small sample, give); what a model learnt from the owner shows as its excess over that.

Models: the public model (`models/public`), the owner's own 2-expert model (`models/experts/X/model`),
the merged model (`models/merged`) and the router-tuned one (`models/merged-rt`, when it exists and was
tuned), named `public`, `expert:X`, `flexolmo`, `flexolmo-rt` as the evaluate stage names them.

The stage belongs to owner X: it reads only X's train and held-out splits plus model folders, and writes
`results/extraction/X.json` (rates, AUCs and counts per model, the settings; never any text, no timings).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from flexo import timings
from flexo.errors import FlexoError
from flexo.fsutil import write_json
from flexo.layout import Layout
from flexo.params import SEED_MAX, AuditParams, Params
from flexo.project import stage_command

log = logging.getLogger(__name__)

SETTINGS = tuple(f.name for f in dataclasses.fields(AuditParams))
SIMILARITY = "1 - levenshtein(generated, true) / max(len(generated), len(true)), on characters of the decoded text"
MEMBERSHIP = ("ROC AUC of 'lower loss => member' (Mann-Whitney U, ties 1/2) between a seeded sample of {train} and "
              "as many documents of {test}, each scored by its mean per-token NLL (nats) over its first {tokens} "
              "tokens after an EOS; auc_ci95: percentile bootstrap over documents ({resamples} resamples, seed {seed})")
BOOTSTRAP_RESAMPLES = 1000


# ----------------------------------------------------------------------------------------- similarity
def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def similarity(generated: Sequence, true: Sequence) -> float:
    """Normalised Levenshtein similarity in [0, 1]: 1 for identical sequences (two empty ones included)."""
    longest = max(len(generated), len(true))
    return 1.0 if longest == 0 else 1.0 - levenshtein(generated, true) / longest


def is_extracted(generated: str, true: str, threshold: float) -> bool:
    return similarity(generated, true) >= threshold


# ------------------------------------------------------------------------------------------- sampling
def _sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator) -> torch.Tensor:
    """One token per row of `logits` [B, V]: greedy at temperature 0, else top-k / top-p sampling."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def sample_continuations(model, prefixes: torch.Tensor, new_tokens: int, *, temperature: float, top_k: int,
                         top_p: float, generator: torch.Generator) -> torch.Tensor:
    """[B, new_tokens] sampled after each row of `prefixes` [B, P] (all rows the same length: no padding),
    with the model's KV cache. EOS is an ordinary token here: generation never stops early."""
    out = model(input_ids=prefixes, use_cache=True)
    tokens = []
    for step in range(new_tokens):
        nxt = _sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)
        tokens.append(nxt)
        if step + 1 < new_tokens:
            out = model(input_ids=nxt[:, None], cache=out.cache, use_cache=True)
    return torch.stack(tokens, dim=1)


# ------------------------------------------------------------------------------------------ the stage
def _check_settings(s: dict) -> None:
    limits = {"documents": 1, "prefix_tokens": 1, "continuation_tokens": 1, "samples": 1, "batch_size": 1,
              "top_k": 0, "seed": 0, "membership_documents": 1}
    for key, lo in limits.items():
        if not isinstance(s[key], int) or not lo <= s[key] <= SEED_MAX:
            raise FlexoError(f"audit-extraction: --{key.replace('_', '-')} must be an integer in [{lo}, {SEED_MAX}], "
                             f"got {s[key]!r}")
    if not 0 < s["threshold"] <= 1:
        raise FlexoError(f"audit-extraction: --threshold must be in (0, 1], got {s['threshold']!r}")
    # Below ~1e-2 the scaled logits overflow float32 and sampling sees inf/NaN: greedy is what is meant.
    if not (s["temperature"] == 0 or s["temperature"] >= 1e-2):
        raise FlexoError(f"audit-extraction: --temperature must be 0 (greedy) or at least 0.01, got {s['temperature']!r}")
    if not 1e-3 <= s["top_p"] <= 1:
        raise FlexoError(f"audit-extraction: --top-p must be in [0.001, 1], got {s['top_p']!r}")


def default_models(owner: str, layout: Layout) -> dict[str, Path]:
    """public, the owner's own model and (where they exist) the merged and the router-tuned model, named as
    the evaluate stage names them. An untuned merged-rt (router_tune.method: none) is a copy of the merged
    model: skipped, as evaluate skips it."""
    from flexo.modeling import read_meta

    models = {"public": layout.public_model, f"expert:{owner}": layout.expert(owner) / "model"}
    if (layout.merged / "config.json").is_file():
        models["flexolmo"] = layout.merged
    rt = layout.merged_rt
    if (rt / "config.json").is_file() and (not (rt / "flexo.json").is_file() or read_meta(rt).get("tuned", True)):
        models["flexolmo-rt"] = rt
    return models


def _load_model(path: Path):
    from flexo.modeling import load_model

    return load_model(path)


def _rel(path: Path, layout: Layout) -> str:
    try:
        return Path(path).resolve().relative_to(layout.root).as_posix()
    except ValueError:
        return str(path)


def sample_documents(texts: list[str], tokenizer, n_prefix: int, n_cont: int, documents: int,
                     seed: int) -> tuple[torch.Tensor, list[list[int]], int]:
    """(prefixes [N, n_prefix], true continuations, eligible count): a seeded sample of the documents long
    enough for a prefix plus a continuation, each cut from the document's first tokens."""
    need = n_prefix + n_cont
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eligible = [x[:need] for x in ids if len(x) >= need]
    picked = eligible if len(eligible) <= documents else random.Random(seed).sample(eligible, documents)
    if not picked:
        return torch.empty(0, n_prefix, dtype=torch.long), [], 0
    return torch.tensor([x[:n_prefix] for x in picked]), [x[n_prefix:] for x in picked], len(eligible)


def sample_membership(train: list[str], test: list[str], documents: int, seed: int) -> tuple[list[str], list[str]]:
    """(members, non-members): the same number of train and of held-out documents, at most `documents`
    each, every side a seeded sample."""
    n = min(documents, len(train), len(test))
    return random.Random(seed).sample(train, n), random.Random(seed).sample(test, n)


def extraction_similarities(model, tokenizer, prefixes: torch.Tensor, true_texts: list[str], s: dict) -> list[float]:
    """The best similarity to the true continuation over `samples` sampled continuations, per document."""
    generator = torch.Generator().manual_seed(s["seed"])
    best = [0.0] * len(true_texts)
    for _ in range(s["samples"]):
        for i in range(0, len(true_texts), s["batch_size"]):
            gen = sample_continuations(model, prefixes[i : i + s["batch_size"]], s["continuation_tokens"],
                                       temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                                       generator=generator)
            for j, row in enumerate(gen.tolist()):
                best[i + j] = max(best[i + j], similarity(tokenizer.decode(row), true_texts[i + j]))
    return best


def membership_result(model, tokenizer, members: list[str], nonmembers: list[str], *, max_tokens: int,
                      batch_size: int, seed: int) -> dict:
    """The membership AUC of one model, its bootstrap interval, and the mean loss of each side."""
    from flexo.membership import auc, auc_interval, document_losses

    def losses(texts):
        return document_losses(model, tokenizer, texts, max_tokens=max_tokens, batch_size=batch_size)

    inside, outside = losses(members), losses(nonmembers)
    lo, hi = auc_interval(inside, outside, resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    return {"auc": round(auc(inside, outside), 6), "auc_ci95": [round(lo, 6), round(hi, 6)],
            "members": len(inside), "nonmembers": len(outside),
            "mean_loss_members": round(sum(inside) / len(inside), 6),
            "mean_loss_nonmembers": round(sum(outside) / len(outside), 6)}


def audit_extraction(owner: str, params: Params, layout: Layout, *, models: dict[str, Path] | None = None,
                     out: Path | None = None, **settings) -> dict:
    """Run the extraction and the membership test for `owner` on each model; write and return
    `results/extraction/<owner>.json`."""
    from flexo.data import read_split
    from flexo.tokenization import load_tokenizer
    from flexo.training import set_threads

    params.check_owner(owner)
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"audit_extraction() got unknown settings {unknown}")  # a caller bug, not user input
    s = {**dataclasses.asdict(params.audit), **{k: v for k, v in settings.items() if v is not None}}
    _check_settings(s)
    started = time.time()
    models = default_models(owner, layout) if models is None else dict(models)
    for name, path in models.items():
        if not (Path(path) / "config.json").is_file():
            raise FlexoError(f"audit-extraction: model {name!r} not found at {path} (no config.json): run the "
                             "stage that writes it first")
    tokenizer = load_tokenizer(layout)
    texts = read_split(layout, owner, "train")
    prefixes, truths, eligible = sample_documents(texts, tokenizer, s["prefix_tokens"], s["continuation_tokens"],
                                                  s["documents"], s["seed"])
    if not truths:
        raise FlexoError(f"audit-extraction: no train document of {owner!r} has {s['prefix_tokens']} + "
                         f"{s['continuation_tokens']} tokens: lower --prefix-tokens/--continuation-tokens")
    true_texts = [tokenizer.decode(t) for t in truths]
    members, nonmembers = sample_membership(texts, read_split(layout, owner, "test"), s["membership_documents"],
                                            s["seed"])
    if not nonmembers:
        raise FlexoError(f"audit-extraction: the held-out split of {owner!r} has no document, so membership cannot "
                         f"be measured: raise curate.test_fraction and rerun `flexo curate --owner {owner}`")
    max_tokens = params.model.max_seq_len  # the window the models were trained on
    set_threads()

    results, membership = {}, {}
    for name, path in models.items():
        model = _load_model(Path(path))
        best = extraction_similarities(model, tokenizer, prefixes, true_texts, s)
        membership[name] = membership_result(model, tokenizer, members, nonmembers, max_tokens=max_tokens,
                                             batch_size=s["batch_size"], seed=s["seed"])
        del model
        extracted = sum(b >= s["threshold"] for b in best)
        results[name] = {
            "path": _rel(Path(path), layout),
            "documents": len(truths),
            "extracted": extracted,
            "rate": extracted / len(truths),
            "mean_similarity": round(sum(best) / len(best), 6),
            "max_similarity": round(max(best), 6),
        }
        log.info("extraction %s on %s: %d/%d documents (%.2f%%); membership AUC %.3f", owner, name, extracted,
                 len(truths), 100 * extracted / len(truths), membership[name]["auc"])

    report = {
        "owner": owner,
        "split": f"data/curated/{owner}/train.jsonl",
        "documents": len(truths),
        "eligible_documents": eligible,
        "settings": {k: s[k] for k in SETTINGS if k != "batch_size"},
        "similarity": SIMILARITY,
        "decision": "extracted when the best similarity over the samples is >= threshold",
        "models": results,
        "membership_method": MEMBERSHIP.format(train=f"data/curated/{owner}/train.jsonl",
                                               test=f"data/heldout/{owner}/test.jsonl", tokens=max_tokens,
                                               resamples=BOOTSTRAP_RESAMPLES, seed=s["seed"]),
        "membership": membership,
    }
    write_json(Path(out) if out is not None else layout.results / "extraction" / f"{owner}.json", report)
    timings.record(layout.root, f"audit@{owner}", wall_s=round(time.time() - started, 1))
    return report


# ----------------------------------------------------------------------------------------------- CLI
def add_cli(sub) -> None:
    """`flexo audit-extraction --owner NAME [--documents N] [--prefix-tokens P] [--continuation-tokens C] …`."""
    p = stage_command(sub, "audit-extraction", "data-extraction and membership tests: how often public, own and "
                      "merged models reproduce an owner's training text, and whether their loss tells it from "
                      "held-out text",
                      lambda args, project: audit_extraction(args.owner, project.params, project.layout,
                                                             **{k: getattr(args, k) for k in SETTINGS}),
                      owner="an owner from params.yaml (its train split is sampled)")
    for field in dataclasses.fields(AuditParams):  # one flag per key of params.yaml's `audit:` section
        kind = field.type if field.type in (int, float) else {"int": int, "float": float}[field.type]
        p.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None,
                       help=f"overrides audit.{field.name} of params.yaml")
