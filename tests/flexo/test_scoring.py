"""The scoring plan shared by the owner-side `score` stage and the central `evaluate` stage, and the
checks on the scores an owner ships."""

from __future__ import annotations

import json
import shutil

import pytest

from flexo.errors import FlexoError
from flexo.layout import Layout
from flexo.scoring import SCORES_FORMAT, effective_limit, model_fingerprints, read_scores

ROWS = ["public", "flexolmo"]


def test_plan_has_flexolmo_rt_only_when_tuned(evaluated, tmp_path):
    import dataclasses

    from flexo.scoring import _ModelCache, _plan

    layout, params, _, _ = evaluated
    fake = Layout.at(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "public").symlink_to(layout.public_model)
    (tmp_path / "models" / "merged").symlink_to(layout.merged)
    shutil.copytree(layout.merged, fake.merged_rt)
    meta = json.loads((fake.merged_rt / "flexo.json").read_text())
    no_baselines = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, baselines=False))

    def names(p):
        return [j.name for j in _plan(p, fake, lambda: None, _ModelCache(fake.public_model))]

    (fake.merged_rt / "flexo.json").write_text(json.dumps(dict(meta, kind="merged-rt", tuned=True)))
    assert names(no_baselines) == ["public", "flexolmo", "flexolmo-rt"]
    (fake.merged_rt / "flexo.json").write_text(json.dumps(dict(meta, kind="merged-rt", tuned=False)))
    assert names(no_baselines) == ["public", "flexolmo"]  # an untuned copy would only repeat flexolmo
    with pytest.raises(FlexoError, match="train-expert --owner alpha"):
        names(params)  # baselines need every owner's model, which the fake project lacks


def _shipped(layout: Layout, who: str, **changes) -> dict:
    rec = {"format": SCORES_FORMAT, "owner": who, "domain": who, "limit": 2, "max_length": 64,
           "fingerprints": {"public": "p", "merged": "m"}, "bpb": {"public": 3.1, "flexolmo": 3.0}, "routing": {},
           "bootstrap": {"public": [3.0, 3.2], "flexolmo": [2.9, 3.1]}}
    rec.update(changes)
    layout.scores(who).parent.mkdir(parents=True, exist_ok=True)
    layout.scores(who).write_text(json.dumps(rec))
    return rec


def test_shipped_scores_are_checked_against_these_models_and_settings(tmp_path):
    layout = Layout.at(tmp_path)
    fps = {"public": "p", "merged": "m"}
    read = lambda: read_scores(layout, "alpha", rows=ROWS, fingerprints=fps, limit=2, max_length=64)  # noqa: E731
    assert read() is None  # nothing shipped: the domain is left out (a warning at the centre)
    _shipped(layout, "alpha")
    assert read()["bpb"]["flexolmo"] == 3.0
    cases = [({"fingerprints": {"public": "p", "merged": "OTHER"}}, "merged differ"),
             ({"limit": 0}, "limit 0"),
             ({"bpb": {"public": 3.1}}, "lacks rows \\['flexolmo'\\]"),
             ({"bpb": {"public": 3.1, "flexolmo": -1.0}}, "unusable values"),
             ({"owner": "beta"}, "not alpha's scores"),
             ({"format": "v0"}, "not alpha's scores"),
             ({"bootstrap": {"public": [3.0, 3.2]}}, "lacks the bootstrap replicates"),
             ({"bootstrap": {"public": [3.0], "flexolmo": [2.9, 3.1]}}, "lacks the bootstrap replicates")]
    for change, message in cases:
        _shipped(layout, "alpha", **change)
        with pytest.raises(FlexoError, match=message) as e:
            read()
        assert "flexo score --owner alpha" in str(e.value) and "\n" not in str(e.value)
    layout.scores("alpha").write_text("{not json")
    with pytest.raises(FlexoError, match="not valid JSON"):
        read()


def test_fingerprints_follow_the_models(evaluated, tmp_path):
    layout, params, _, _ = evaluated
    fps = model_fingerprints(params, layout)
    assert set(fps) == {"public", "package:alpha", "package:beta", "merged"}
    assert fps == model_fingerprints(params, layout)  # deterministic


def test_limit_bounds():
    assert effective_limit(_params(0), None) is None
    assert effective_limit(_params(5), None) == 5 and effective_limit(_params(5), 0) is None
    with pytest.raises(FlexoError, match="--limit must be between 0"):
        effective_limit(_params(0), -1)


def _params(limit: int):
    from types import SimpleNamespace

    return SimpleNamespace(evaluate=SimpleNamespace(limit=limit))
