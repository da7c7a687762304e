"""Router-input statistics: what an owner ships for federated router tuning, made private and small, and
how the centre reads them.

Each owner summarises its own 2-expert model's router inputs on its own train text, layer by layer: the
mean and the covariance of the hidden states the routers see — numbers, never text or token ids — in
`models/router_updates/<owner>.safetensors` + `.json`. Two properties make them safe to ship:

- **Differential privacy** (`router_tune.dp_epsilon` > 0). The unit of privacy is one document (each
  train document contributes its first `model.max_seq_len` tokens). Every token's router input is
  clipped to norm C_ℓ (`router_tune.dp_clip` × the public model's median norm at layer ℓ on public text:
  public information, so choosing it leaks nothing); the per-document sums of the clipped vectors, of
  their outer products and the token count are added up; Gaussian noise is added to every coordinate of
  those sums, with the noise multiplier that Google's `dp_accounting` (its RDP accountant) calibrates to
  the target (ε, δ) for one Gaussian release whose L2 sensitivity to adding or removing one document is
  known from the clipping. Only the first `router_tune.stats_documents` documents are summarised, so
  removing one of them brings the next one in: the sensitivity is that of replacing one document, twice
  that of adding one, and it is used whatever the number of documents (using it only above the cap would
  tell the centre which side of the cap the owner is). The exact document count is not shipped under DP
  (only the noisy token count). Mean and covariance are computed from the noisy sums (post-processing). The
  noise is drawn from a generator keyed by a secret that never leaves the owner's machine
  (`.cache/dp-secret`), so a rerun on that machine gives the same bytes and nobody else can subtract it.
- **A low-rank form** (`router_tune.stats_rank` = r > 0): the top-r eigenpairs of the covariance plus the
  mean of the other eigenvalues (an isotropic rest), so what ships grows as r·h, not h².

The centre reads them back (:func:`read_update`), checked (owner, public fingerprint, shapes, finiteness,
definiteness, token count) before any model is loaded, expands the low-rank form to a covariance, and
computes the public class's statistics from the public model on public text (:func:`public_stats`).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flexo.data import read_split
from flexo.errors import FlexoError
from flexo.fsutil import read_json
from flexo.layout import Layout
from flexo.modeling import load_model, load_tokenizer_from
from flexo.params import PUBLIC, Params
from flexo.router_fit import check_stats, gates
from flexo.tokenization import eos_documents, padded_batch

# Fewer tokens than this (or than TOKENS_PER_DIM per dimension the statistics describe: h for the full
# covariance, r for rank r) and a mean/covariance would say too much about too little text.
MIN_TOKENS = 2048
REPLACE_ONE = 2  # the sensitivity of replacing one document over that of adding one (see the module docstring)
TOKENS_PER_DIM = 8
ACCOUNTANT = ("dp_accounting 0.6 RdpAccountant, one GaussianDpEvent (add/remove-one-document adjacency; the "
              "noise is scaled to the sensitivity of replacing one document, since a removal brings the next "
              "document in under the stats_documents cap)")


def min_tokens(hidden: int, rank: int) -> int:
    return max(MIN_TOKENS, TOKENS_PER_DIM * (rank if rank else hidden))


# --------------------------------------------------------------------------------------- features
@torch.no_grad()
def document_features(model, tokenizer, texts: list[str], *, max_tokens: int, max_documents: int,
                      batch_size: int = 16) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's router input ([tokens, h], fp32) for the first `max_documents` documents, each fed
    after an EOS (the separator the models were trained with; not counted) and cut to `max_tokens` tokens,
    and the document index of every row — per-document rows are what per-document clipping needs."""
    docs = eos_documents(tokenizer, texts[:max_documents], max_tokens)
    captured: list[list[torch.Tensor]] = [[] for _ in gates(model)]
    hooks = [g.register_forward_hook(lambda m, inp, out, i=i: captured[i].append(inp[0].float()))
             for i, g in enumerate(gates(model))]
    model.eval()
    rows: list[list[torch.Tensor]] = [[] for _ in captured]
    index = []
    try:
        for start in range(0, len(docs), batch_size):
            batch = docs[start: start + batch_size]
            ids, mask = padded_batch(batch, tokenizer.eos_token_id)
            width = ids.shape[1]
            for c in captured:
                c.clear()
            model(input_ids=ids, attention_mask=mask)
            keep = mask.bool().clone()
            keep[:, 0] = False  # the EOS prefix
            for layer, c in enumerate(captured):
                h = c[0].reshape(len(batch), width, -1)
                rows[layer].append(h[keep])
            index.append(torch.arange(start, start + len(batch)).repeat_interleave(keep.sum(1)))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(r) for r in rows], torch.cat(index)


def median_norms(features: list[torch.Tensor]) -> list[float]:
    return [float(h.norm(dim=1).median()) for h in features]


# -------------------------------------------------------------------------------------- summaries
@dataclass(frozen=True)
class Privacy:
    """(ε, δ)-DP for the statistics: the clip norm of every layer and the calibrated noise multiplier."""

    epsilon: float
    delta: float
    clip: list[float]
    max_tokens: int
    noise_multiplier: float

    def record(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": round(self.noise_multiplier, 6),
                "clip_norms": [round(c, 6) for c in self.clip], "max_tokens_per_document": self.max_tokens,
                "unit": "one document", "accountant": ACCOUNTANT,
                "mechanism": "Gaussian noise on the sums of per-token-clipped router inputs, of their outer "
                             "products and of the token count, per document at most max_tokens_per_document "
                             "tokens; mean and covariance computed from the noisy sums"}


def calibrate(epsilon: float, delta: float, documents: int) -> float:
    """The Gaussian noise multiplier that `dp_accounting` says gives (ε, δ) for one release."""
    import dp_accounting
    from dp_accounting import rdp

    if not 0 < delta < 1 / max(documents, 1):
        raise FlexoError(f"router_tune.dp_delta {delta} must be above 0 and below 1/documents = 1/{documents}: "
                         "lower it (or summarise more documents with router_tune.stats_documents)")
    try:
        return float(dp_accounting.calibrate_dp_mechanism(
            rdp.RdpAccountant, dp_accounting.GaussianDpEvent, epsilon, delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, 1e4)))
    except (ValueError, RuntimeError) as e:
        raise FlexoError(f"router_tune.dp_epsilon {epsilon} cannot be met by the Gaussian mechanism with a noise "
                         f"multiplier up to 1e4 at δ {delta} ({e}): raise router_tune.dp_epsilon") from None


def achieved_epsilon(noise_multiplier: float, delta: float) -> float:
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier))
    return float(accountant.get_epsilon(delta))


def _secret_generator(secret: bytes, what: str) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(secret + what.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


def owner_secret(layout: Layout) -> bytes:
    """A random secret kept on this machine only (never shipped, never in git or DVC): it keys the DP noise."""
    path = layout.root / ".cache" / "dp-secret"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


def summarize(features: list[torch.Tensor], doc_index: torch.Tensor, *, rank: int = 0,
              privacy: Privacy | None = None, secret: bytes = b"", what: str = "") -> dict[str, torch.Tensor]:
    """Per layer, the mean and covariance of `features` (exactly, or from DP-noised sums with `privacy`),
    shipped in full (`cov`) or, with `rank` r > 0, as the top-r eigenpairs plus an isotropic rest."""
    documents = int(doc_index.max()) + 1 if len(doc_index) else 0
    out: dict[str, torch.Tensor] = {}
    tokens = float(len(doc_index))
    generator = _secret_generator(secret, what) if privacy else None
    if privacy:
        # One Gaussian release of every layer's normalised sums: each document changes them by at most 1
        # per layer and part (first moment, second moment) and the count by at most 1 -> sqrt(2L + 1) for L
        # layers; twice that, since removing one of the first stats_documents documents brings the next in.
        sensitivity = REPLACE_ONE * math.sqrt(2 * len(features) + 1)
        std = privacy.noise_multiplier * sensitivity
        tokens = tokens / privacy.max_tokens + std * float(torch.randn(1, generator=generator, dtype=torch.float64))
        tokens = max(tokens * privacy.max_tokens, 1.0)
    for layer, h in enumerate(features):
        h64 = h.double()
        if privacy:
            c, t = privacy.clip[layer], privacy.max_tokens
            h64 = h64 * (c / h64.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
            first = h64.sum(0) / (t * c) + std * torch.randn(h64.shape[1], generator=generator, dtype=torch.float64)
            noise = torch.randn(h64.shape[1], h64.shape[1], generator=generator, dtype=torch.float64)
            second = (h64.T @ h64) / (t * c * c) + std * (noise + noise.T) / 2
            mean = first * (t * c) / tokens
            cov = second * (t * c * c) / tokens - torch.outer(mean, mean)
        else:
            mean = h64.mean(0)
            cov = torch.cov(h64.T)
        cov = (cov + cov.T) / 2
        values, vectors = torch.linalg.eigh(cov)
        floor = 1e-6 * float(values.abs().max().clamp_min(1e-30))
        values = values.clamp(min=floor)  # projected onto the positive definite cone (noise can make it indefinite)
        out[f"layers.{layer}.mean"] = mean.float().contiguous()
        if rank and rank < len(values):
            top = torch.argsort(values, descending=True)
            keep, rest = top[:rank], top[rank:]
            out[f"layers.{layer}.eigvecs"] = vectors[:, keep].T.float().contiguous()
            out[f"layers.{layer}.eigvals"] = values[keep].float().contiguous()
            out[f"layers.{layer}.rest"] = values[rest].mean().reshape(1).float()
        else:
            out[f"layers.{layer}.cov"] = ((vectors * values) @ vectors.T).float().contiguous()
    out["tokens"] = torch.tensor([int(round(tokens))], dtype=torch.long)
    if not privacy:  # the exact count is not private: under DP only the noisy token count ships
        out["documents"] = torch.tensor([documents], dtype=torch.long)
    return out


def dense(stats: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The statistics with every layer's covariance as a dense matrix (a low-rank form expanded)."""
    out = {k: v for k, v in stats.items() if ".eigvecs" not in k and ".eigvals" not in k and ".rest" not in k}
    for i in range(num_layers):
        if f"layers.{i}.cov" in stats:
            continue
        vectors, values = stats.get(f"layers.{i}.eigvecs"), stats.get(f"layers.{i}.eigvals")
        rest = stats.get(f"layers.{i}.rest")
        if vectors is None or values is None or rest is None or vectors.ndim != 2 or values.shape != vectors.shape[:1]:
            continue  # check_stats names the missing layer
        u = vectors.double().T
        d = u.shape[0]
        cov = (u * values.double()) @ u.T + float(rest) * (torch.eye(d, dtype=torch.float64) - u @ u.T)
        out[f"layers.{i}.cov"] = cov.float().contiguous()
    return out


def shipped_numbers(stats: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in stats.values())


# ------------------------------------------------------------------------------------- the centre
def update_name(layout: Layout, owner: str) -> str:
    return f"router statistics of {owner!r} ({layout.router_update(owner)})"


def read_update(layout: Layout, owner: str, public_fp: str | None, num_layers: int, hidden: int
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """(an owner's statistics with dense covariances, its manifest), checked."""
    path = layout.router_update(owner)
    if not path.with_suffix(".json").is_file():
        raise FlexoError(f"no router statistics of {owner!r} ({path}): run `flexo router-update --owner {owner}` "
                         "(the owner's side of router_tune.method: federated) first")
    info = read_json(path.with_suffix(".json"), what="router statistics manifest")
    if info.get("skipped"):
        raise FlexoError(f"the router statistics of {owner!r} were skipped (method {info.get('method')}): rerun "
                         f"`flexo router-update --owner {owner}` with router_tune.method: federated")
    if public_fp and info.get("public_fingerprint") != public_fp:
        raise FlexoError(f"the router statistics of {owner!r} come from an expert trained against another public "
                         f"model: rerun `flexo train-expert --owner {owner}` and `flexo router-update --owner {owner}`")
    try:
        stats = load_file(path)
    except (SafetensorError, OSError) as e:
        raise FlexoError(f"router statistics {path} are unreadable ({e}): rerun `flexo router-update --owner {owner}`") from None
    if info.get("owner") != owner:
        raise FlexoError(f"router statistics {path} say owner {info.get('owner')!r}, not {owner!r}: rerun "
                         f"`flexo router-update --owner {owner}`")
    rank = info.get("rank") or 0
    # Under DP the token count is noisy: the owner checked the exact count before noising (router_update), so
    # the centre asks only for a positive one (else a DP owner would be refused at random).
    need = 1 if info.get("dp") else min_tokens(hidden, rank if isinstance(rank, int) else 0)
    check_stats(dense(stats, num_layers), num_layers, hidden, update_name(layout, owner), min_tokens=need)
    return dense(stats, num_layers), info


def public_features(params: Params, layout: Layout) -> list[torch.Tensor]:
    """The public model's router inputs on public train documents (public data only)."""
    model = load_model(layout.public_model)
    tokenizer = load_tokenizer_from(layout.public_model, fix="rerun `flexo train-public`")
    features, _ = document_features(model, tokenizer, read_split(layout, PUBLIC, "train"),
                                    max_tokens=params.model.max_seq_len,
                                    max_documents=params.router_tune.stats_documents)
    return features


def public_stats(params: Params, layout: Layout) -> dict[str, torch.Tensor]:
    """The public class: exact mean and covariance of the public model's router inputs on public text."""
    features = public_features(params, layout)
    return summarize(features, torch.zeros(len(features[0]), dtype=torch.long))


def clip_norms(params: Params, layout: Layout) -> list[float]:
    """C_ℓ = router_tune.dp_clip × the median router-input norm of the public model on public text (public
    information: choosing the clip norm this way spends no privacy)."""
    return [params.router_tune.dp_clip * n for n in median_norms(public_features(params, layout))]


def embedded_path(model_dir: Path) -> Path:
    """Where a router-tuned model keeps the statistics it was fitted on (for an exact opt-out later)."""
    return Path(model_dir) / "router_stats.safetensors"
