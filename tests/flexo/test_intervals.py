"""Paired bootstrap intervals (flexo.intervals): the replicates are lm-eval's bits per byte of resampled
documents, the same resamples for every model, so two models pair draw by draw."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flexo.intervals import ITERS, bpb, draws, paired, replicates


def docs(n: int, seed: int, shift: float = 0.0) -> list[tuple[float, int]]:
    rng = np.random.default_rng(seed)
    return [(-float(rng.uniform(500, 3000)) - shift * 100, int(rng.integers(400, 1200))) for _ in range(n)]


def test_bpb_is_lm_evals_aggregate_and_replicates_centre_on_it():
    d = docs(30, 0)
    assert bpb(d) == pytest.approx(-sum(x for x, _ in d) / sum(b for _, b in d) / math.log(2))
    reps = replicates(d)
    assert len(reps) == ITERS and replicates(d) == reps  # deterministic
    assert np.mean(reps) == pytest.approx(bpb(d), rel=0.02)
    assert (draws(30) == draws(30)).all() and not (draws(30)[:, :29] == draws(29)).all()


def test_a_model_against_itself_is_exactly_zero_and_a_uniform_loss_shift_is_detected():
    d = {"x": docs(12, 1), "y": docs(20, 2)}
    worse = {k: [(ll - 50.0, n) for ll, n in v] for k, v in d.items()}  # every document 50 nats worse
    point = {k: bpb(v) for k, v in d.items()}
    point_w = {k: bpb(v) for k, v in worse.items()}
    reps = {k: replicates(v) for k, v in d.items()}
    reps_w = {k: replicates(v) for k, v in worse.items()}
    same = paired(("a", "a"), point, point, reps, reps, ["x", "y"])
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and same["shown"] == "no difference shown"
    c = paired(("a", "w"), point, point_w, reps, reps_w, ["x", "y"])
    assert c["diff"] < 0 and c["ci95"][1] < 0 and c["shown"] == "a better"
    # unpaired noise this large would hide the shift; pairing removes the documents' own spread
    assert c["ci95"][1] - c["ci95"][0] < abs(c["diff"])


def test_noise_that_is_not_a_difference_is_not_called_one():
    rng = np.random.default_rng(5)
    base = docs(15, 3)
    noisy = [(ll + float(rng.normal(0, 40)), n) for ll, n in base]  # ± 40 nats per document, no bias
    c = paired(("a", "b"), {"x": bpb(base)}, {"x": bpb(noisy)}, {"x": replicates(base)}, {"x": replicates(noisy)}, ["x"])
    assert c["ci95"][0] <= c["diff"] <= c["ci95"][1]
    assert c["shown"] == "no difference shown"
