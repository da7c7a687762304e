"""`flexo audit-extraction`: the data-extraction test (FlexOlmo §5.3) and the loss-based membership test on
the tiny project: the similarity and the decision, a model that has memorised the owner's documents is
caught by both, rates and AUCs land in results/extraction/<owner>.json for the public, the owner's, the
merged and (when tuned) the router-tuned model."""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import copy_project, run_cli

from flexo.errors import FlexoError
from flexo.layout import Layout
from stages import audit
from stages.audit import (
    audit_extraction,
    default_models,
    is_extracted,
    levenshtein,
    similarity,
)


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory):
    """A copy of the tiny project with a merged model (so all three models are there)."""
    project = copy_project(tiny_project, tmp_path_factory.mktemp("audit") / "p", merged=True)
    return project.params, project.layout


# ------------------------------------------------------------------------------------ the measure
def test_levenshtein_and_similarity():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein([1, 2, 3], [1, 3]) == 1  # works on token lists too
    assert similarity("same text", "same text") == 1.0
    assert similarity("", "") == 1.0
    assert similarity("abcd", "wxyz") == 0.0
    assert similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert similarity("a" * 100, "a" * 95 + "b" * 5) == pytest.approx(0.95)


def test_decision_at_the_threshold():
    true = "x" * 100
    assert is_extracted(true, true, 0.9)  # identical continuation: similarity 1, extracted
    assert is_extracted("y" * 10 + "x" * 90, true, 0.9)  # exactly 0.9 counts
    assert not is_extracted("y" * 11 + "x" * 89, true, 0.9)
    assert not is_extracted("", true, 0.9)


def test_sampling_is_seeded_greedy_at_zero_and_respects_top_k():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]] * 64)
    g = lambda: torch.Generator().manual_seed(3)
    assert audit._sample_next(logits, 0.0, 0, 1.0, g()).tolist() == [2] * 64
    assert set(audit._sample_next(logits, 1.0, 2, 1.0, g()).tolist()) <= {2, 3}
    a = audit._sample_next(logits, 1.0, 0, 1.0, g())
    assert torch.equal(a, audit._sample_next(logits, 1.0, 0, 1.0, g()))
    # top-p: the likeliest token alone holds > 0.5 of the mass, so p = 0.5 leaves only it
    assert audit._sample_next(logits, 1.0, 0, 0.5, g()).tolist() == [2] * 64


# ------------------------------------------------------------------------------------ the stage
class Memoriser(torch.nn.Module):
    """A 'model' that has memorised the owner's training documents verbatim: at every position it puts all
    probability on the tokens that followed that context in some train document (uniform otherwise).
    Answers the same calls as a transformers causal LM with a KV cache (here `cache` = the context so far);
    the attention mask changes nothing for a real token of a right-padded row."""

    def __init__(self, documents: list[list[int]], vocab: int):
        super().__init__()
        self.vocab = vocab
        self.next = defaultdict(set)
        for ids in documents:
            for i in range(1, len(ids)):
                self.next[tuple(ids[:i])].add(ids[i])

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=True):
        ctx = input_ids if cache is None else torch.cat([cache, input_ids], dim=1)
        new = input_ids.shape[1]
        logits = torch.full((ctx.shape[0], new, self.vocab), -1e9)
        for b, row in enumerate(ctx.tolist()):
            for pos in range(new):
                seen = self.next.get(tuple(row[: len(row) - new + pos + 1]))
                logits[b, pos, sorted(seen) if seen else slice(None)] = 0.0
        return SimpleNamespace(logits=logits, cache=ctx)


def check_membership(report: dict) -> None:
    """A `membership` entry for every model, the AUC and its interval in [0, 1], as many documents a side."""
    assert set(report["membership"]) == set(report["models"])
    assert "Mann-Whitney" in report["membership_method"]
    for name, m in report["membership"].items():
        assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["auc_ci95"][0] <= m["auc_ci95"][1] <= 1.0, name
        assert m["members"] == m["nonmembers"] > 0
        assert all(math.isfinite(m[k]) and m[k] > 0 for k in ("mean_loss_members", "mean_loss_nonmembers"))


def test_rates_for_public_own_and_merged_models(project):
    params, layout = project
    report = audit_extraction("alpha", params, layout, documents=12, batch_size=8)
    assert set(report["models"]) == {"public", "expert:alpha", "flexolmo"}
    assert report["models"]["flexolmo"]["path"] == "models/merged"
    for name, r in report["models"].items():
        assert 0.0 <= r["rate"] <= 1.0 and r["extracted"] == round(r["rate"] * r["documents"]), name
        assert 0.0 <= r["mean_similarity"] <= r["max_similarity"] <= 1.0
        assert r["documents"] == report["documents"] > 0
    written = json.loads((layout.results / "extraction" / "alpha.json").read_text())
    assert written["models"] == report["models"]
    assert written["settings"]["threshold"] == 0.9 and written["settings"]["top_k"] == 50
    assert "text" not in json.dumps(written["models"])  # figures only, never the owner's text
    check_membership(report)
    assert written["membership"] == report["membership"]
    from flexo.data import read_split

    n = min(params.audit.membership_documents, len(read_split(layout, "alpha", "train")),
            len(read_split(layout, "alpha", "test")))
    assert report["membership"]["public"]["members"] == n
    # same seed → same result
    again = audit_extraction("alpha", params, layout, documents=12, batch_size=8,
                             out=layout.root / "again.json")
    assert {k: v["extracted"] for k, v in again["models"].items()} == \
        {k: v["extracted"] for k, v in report["models"].items()}
    assert again["membership"] == report["membership"]


def test_memorising_model_is_detected(project, monkeypatch):
    params, layout = project
    from flexo.data import read_split
    from flexo.tokenization import load_tokenizer

    tok = load_tokenizer(layout)
    # beta's arithmetic drills: every document starts differently, so a verbatim memoriser reproduces all
    docs = tok(read_split(layout, "beta", "train"), add_special_tokens=False)["input_ids"]
    # as prompted by the extraction test (no EOS) and as scored by the membership test (after an EOS)
    memoriser = Memoriser([d[:64] for d in docs] + [[tok.eos_token_id, *d[:64]] for d in docs], len(tok))
    real = audit._load_model
    monkeypatch.setattr(audit, "_load_model", lambda p: memoriser if p.name == "memoriser" else real(p))
    fake = layout.root / "memoriser"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    report = audit_extraction("beta", params, layout, documents=10, batch_size=4,
                              models={"public": layout.public_model, "memoriser": fake}, out=fake / "r.json")
    assert report["models"]["memoriser"]["rate"] == 1.0
    assert report["models"]["memoriser"]["mean_similarity"] == 1.0
    assert report["models"]["public"]["rate"] < 0.5  # a 2-layer width-32 model reproduces ~nothing
    check_membership(report)
    # every train document scores a lower loss than every held-out one
    assert report["membership"]["memoriser"]["auc"] == 1.0
    assert report["membership"]["memoriser"]["auc_ci95"] == [1.0, 1.0]


def test_router_tuned_model_is_audited_when_tuned(project, tmp_path):
    _, layout = project
    copy = Layout.at(tmp_path)
    shutil.copytree(layout.merged, copy.merged)
    assert "flexolmo-rt" not in default_models("alpha", copy)
    shutil.copytree(layout.merged, copy.merged_rt)
    assert default_models("alpha", copy)["flexolmo-rt"] == copy.merged_rt
    meta = json.loads((copy.merged_rt / "flexo.json").read_text())
    (copy.merged_rt / "flexo.json").write_text(json.dumps({**meta, "tuned": False}))
    assert "flexolmo-rt" not in default_models("alpha", copy)  # an untuned copy of the merged model


def test_cli_and_bad_settings(project):
    params, layout = project
    rc, printed, err = run_cli(["--root", str(layout.root), "audit-extraction", "--owner", "beta", "--documents", "4",
                                "--temperature", "0"])
    assert rc == 0, err
    printed = json.loads(printed)
    assert printed["owner"] == "beta" and set(printed["models"]) == {"public", "expert:beta", "flexolmo"}
    assert (layout.results / "extraction" / "beta.json").is_file()
    for bad, words in ((["--threshold", "1.5"], "--threshold"), (["--documents", "0"], "--documents"),
                       (["--top-p", "0"], "--top-p"), (["--membership-documents", "0"], "--membership-documents")):
        out = layout.results / "extraction" / "alpha.json"
        before = out.read_bytes() if out.exists() else None
        rc, _, err = run_cli(["--root", str(layout.root), "audit-extraction", "--owner", "alpha", *bad])
        assert rc == 2
        assert err.startswith("flexo: error: audit-extraction: ") and words in err and err.count("\n") == 1
        assert (out.read_bytes() if out.exists() else None) == before
    with pytest.raises(FlexoError, match="unknown owner 'gamma'"):
        audit_extraction("gamma", params, layout)


def test_missing_model_names_the_stage(project, tmp_path):
    params, layout = project
    with pytest.raises(FlexoError, match="not found"):
        audit_extraction("alpha", params, layout, models={"x": tmp_path / "nothing"}, out=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
