"""Paired bootstrap intervals for bits-per-byte comparisons, computable across machines.

A comparison of two models is a claim only with its interval, and the interval must be *paired*: both
models scored on the same documents, each bootstrap draw resampling the same documents for both. Each
owner's held-out documents stay on the owner's machine, and so do their per-document values: the owner
ships, per model, `ITERS` bootstrap replicates of its domain's bits per byte, drawn with indices that
depend only on the number of documents and a fixed seed (:func:`replicates`). Every model of that domain
is resampled with the same indices, so the centre pairs any two models by subtracting their replicate
arrays, and averages the owners' arrays draw by draw for the mean over owner domains (domains are
resampled independently, as separate samples). Deterministic: the same scores give the same bytes.

bits per byte of a set of documents is lm-eval's: −Σ log-likelihood / (Σ bytes · ln 2).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

ITERS = 1000  # bootstrap draws per domain
SEED = 20250709  # fixed: the draws of a domain depend only on its number of documents


def bpb(documents: Sequence[tuple[float, int]]) -> float:
    ll = sum(d[0] for d in documents)
    n_bytes = sum(d[1] for d in documents)
    return -ll / (n_bytes * math.log(2))


def draws(n: int, iters: int = ITERS) -> np.ndarray:
    """[iters, n] document indices: the same for every model scored on the same n documents."""
    return np.random.default_rng([SEED, n]).integers(0, n, size=(iters, n))


def replicates(documents: Sequence[tuple[float, int]], iters: int = ITERS) -> list[float]:
    """Bits per byte of `iters` bootstrap resamples of the documents (rounded: a shipped, hashed output)."""
    ll = np.array([d[0] for d in documents], dtype=np.float64)
    n_bytes = np.array([d[1] for d in documents], dtype=np.float64)
    idx = draws(len(documents), iters)
    return [round(float(v), 6) for v in -ll[idx].sum(axis=1) / (n_bytes[idx].sum(axis=1) * math.log(2))]


def paired(names: tuple[str, str], a: dict[str, float], b: dict[str, float], reps_a: dict[str, list[float]],
           reps_b: dict[str, list[float]], domains: Sequence[str]) -> dict:
    """a − b of the mean bits per byte over `domains`, with its 95% paired bootstrap interval and what it
    shows (lower bits per byte is better)."""
    diff = sum(a[d] - b[d] for d in domains) / len(domains)
    reps = np.mean([np.asarray(reps_a[d]) - np.asarray(reps_b[d]) for d in domains], axis=0)
    lo, hi = (float(v) for v in np.percentile(reps, [2.5, 97.5]))
    return {"diff": round(diff, 4), "ci95": [round(lo, 4), round(hi, 4)], "relative": round(diff / (
        sum(b[d] for d in domains) / len(domains)), 5), "shown": reading(lo, hi, *names)}


def reading(lo: float, hi: float, a: str, b: str, lower_is_better: bool = True) -> str:
    """What a 95% interval of a − b shows: "no difference shown" when it holds zero, else who is better."""
    if lo <= 0 <= hi:
        return "no difference shown"
    first_better = (hi < 0) if lower_is_better else (lo > 0)
    return f"{a} better" if first_better else f"{b} better"
