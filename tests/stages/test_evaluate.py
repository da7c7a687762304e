"""The domains suite and the evaluate stage: lm-eval's bits-per-byte equals a direct computation; the stage
writes every model × domain score, the tables and the figures; an opt-out row is evaluated with the mask."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import direct_rolling_logprobs, run_cli
from flexo.errors import FlexoError
from flexo.evaluation import GROUP, evaluate_model, load_tokenizer_for, read_domains, task_name, write_domain_tasks
from flexo.modeling import load_model
from flexo.params import load_params


def test_domain_tasks_folder(tiny_project, tmp_path):
    layout = tiny_project
    tasks = write_domain_tasks(layout, ["public", "alpha", "beta"], tmp_path / "tasks", cache_dir=tmp_path / "ds")
    assert read_domains(tasks) == {d: task_name(d) for d in ("public", "alpha", "beta")}
    cfg = yaml.safe_load((tasks / f"{task_name('alpha')}.yaml").read_text())
    data_file = cfg["dataset_kwargs"]["data_files"]["test"]
    # relative to the task folder itself (machine-independent bytes); evaluate_model reads from there
    assert not data_file.startswith("/")
    assert (tasks / data_file).resolve() == (layout.heldout("alpha") / "test.jsonl").resolve()
    assert (tasks / cfg["dataset_kwargs"]["cache_dir"]).resolve() == (tmp_path / "ds").resolve()
    assert cfg["output_type"] == "loglikelihood_rolling"
    assert [m["metric"] for m in cfg["metric_list"]] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    group = yaml.safe_load((tasks / f"{GROUP}.yaml").read_text())
    assert group["group"] == GROUP and group["task"] == [task_name(d) for d in ("public", "alpha", "beta")]
    with pytest.raises(FlexoError, match="flexo curate --owner gamma"):
        write_domain_tasks(layout, ["gamma"], tmp_path / "tasks2")


def test_bits_per_byte_equals_direct_computation(tiny_project, tmp_path):
    layout = tiny_project
    tasks = write_domain_tasks(layout, ["alpha"], tmp_path / "tasks", cache_dir=tmp_path / "ds")
    model_dir = layout.expert("alpha") / "model"  # a 2-expert MoE: routing must not depend on batch padding
    limit, max_len = 3, 64
    got = evaluate_model(model_dir, None, tasks, limit=limit, batch_size=4, max_length=max_len,
                         raw_out=tmp_path / "raw.json")
    model = load_model(model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [json.loads(line)["text"] for line in (layout.heldout("alpha") / "test.jsonl").read_text().splitlines()][:limit]
    total_ll = total_bytes = 0
    for text in docs:
        ids = tok.encode(text, add_special_tokens=False)
        total_ll += sum(direct_rolling_logprobs(model, ids, tok.eos_token_id, max_len))
        total_bytes += len(text.encode("utf-8"))
    assert max(len(tok.encode(t, add_special_tokens=False)) for t in docs) > 2 * max_len  # several windows
    want = -total_ll / total_bytes / math.log(2)
    assert got["alpha"] == pytest.approx(want, abs=1e-4)
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert raw["results"][task_name("alpha")]["bits_per_byte,none"] == pytest.approx(got["alpha"])


MODELS = ["public", "flexolmo", "soup", "soup-weighted", "btm", "btm-top2", "prompt-routing", "expert:alpha", "expert:beta", "optout:alpha", "optout:beta"]
DOMAINS = ["public", "alpha", "beta"]


def test_stage_writes_every_model_and_domain(evaluated):
    layout, params, metrics, before = evaluated
    on_disk = json.loads((layout.results / "metrics.json").read_text())
    assert list(on_disk["bpb"]) == MODELS  # no merged-rt in the fixture: no flexolmo-rt row
    for m in MODELS:
        assert list(on_disk["bpb"][m]) == DOMAINS
        assert all(0 < v < 20 for v in on_disk["bpb"][m].values())
        assert on_disk["avg_owner_bpb"][m] == pytest.approx((on_disk["bpb"][m]["alpha"] + on_disk["bpb"][m]["beta"]) / 2, abs=1e-6)
        assert (layout.results / "lm_eval" / f"{m.replace(':', '-')}.json").is_file()
    assert on_disk["limit"] == 2 and "wall_s" not in on_disk  # timings stay out of DVC-hashed outputs
    # An owner's own model is better on its own domain than the public model (it was trained on it).
    assert on_disk["bpb"]["expert:beta"]["beta"] < on_disk["bpb"]["public"]["beta"]
    # Nothing of the other stages' outputs was removed or added.
    assert sorted(p.relative_to(layout.root) for p in (layout.root / "models").rglob("*")) == before
    assert not list(layout.results.rglob(".*.tmp-*"))


def test_comparisons_are_paired_intervals_around_the_table_differences(evaluated):
    layout, params, metrics, _ = evaluated
    on_disk = json.loads((layout.results / "metrics.json").read_text())
    avg = on_disk["avg_owner_bpb"]
    assert set(on_disk["comparisons"]) == {"flexolmo - public", "flexolmo - btm", "btm - soup", "soup - public",
                                           "flexolmo - soup", "flexolmo - prompt-routing", "soup-weighted - soup",
                                           "btm-top2 - btm"}  # no flexolmo-rt row in the fixture
    for pair, c in on_disk["comparisons"].items():
        a, b = pair.split(" - ")
        assert c["mean"]["diff"] == pytest.approx(avg[a] - avg[b], abs=1e-4)
        lo, hi = c["mean"]["ci95"]
        assert lo <= hi and (c["mean"]["shown"] == "no difference shown") == (lo <= 0 <= hi)
        for d in params.owners:
            assert c["domains"][d]["diff"] == pytest.approx(on_disk["bpb"][a][d] - on_disk["bpb"][b][d], abs=1e-4)
    assert "95% paired bootstrap" in (layout.results / "table.md").read_text()


def test_table_bolds_the_best_per_column(evaluated):
    layout, _, metrics, _ = evaluated
    text = (layout.results / "table.md").read_text()
    assert "lower is better" in text
    first_table = text.split("\n\n")[1]  # caption, the table, then the paired comparisons
    rows = [line for line in first_table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["model", *DOMAINS, "avg (owners)"]
    body = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in rows[1:]}
    assert list(body) == MODELS
    for col in range(len(header) - 1):
        values = {m: float(cells[col].strip("*")) for m, cells in body.items()}
        bold = {m for m, cells in body.items() if cells[col].startswith("**")}
        assert bold and all(values[m] == min(values.values()) for m in bold)


def test_figures_and_optout_report(evaluated):
    layout, _, metrics, _ = evaluated
    for name in ("bpb.png", "optout.png"):
        data = (layout.results / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    text = (layout.results / "optout.md").read_text()
    assert "| optout:alpha |" in text and "| optout:beta |" in text
    full = metrics["bpb"]["flexolmo"]["alpha"]
    delta = metrics["bpb"]["optout:alpha"]["alpha"] - full
    assert f"({delta:+.3f})" in text


def test_optout_row_is_the_masked_model(evaluated, tmp_path):
    """optout:alpha differs from the full merged model on alpha's domain, and equals a model merged
    without alpha (deleting an expert = masking its logit), evaluated through the CLI."""
    from stages.merge import merge

    layout, params, metrics, _ = evaluated
    full, opt = metrics["bpb"]["flexolmo"], metrics["bpb"]["optout:alpha"]
    assert abs(opt["alpha"] - full["alpha"]) > 1e-3
    without = tmp_path / "merged-without-alpha"
    merge(params, layout, exclude=["alpha"], out=without)

    rc, out, err = run_cli(["--root", str(layout.root), "evaluate", "--model", str(without), "--limit", "2"])
    assert rc == 0, err
    result = json.loads(out)  # printed as JSON
    for d in DOMAINS:
        assert result["bpb"][d] == pytest.approx(opt[d], abs=1e-4)
    assert (layout.results / "adhoc" / "merged-without-alpha.domains.json").is_file()


def test_member_rows_replay_btm_and_equal_direct_evaluation(evaluated, tmp_path):
    """`public` and `expert:*` are served from BTM's pass over its members: the same bits-per-byte as
    evaluating each model folder on its own, and lm-eval's raw results say the row was replayed."""
    layout, params, metrics, _ = evaluated
    tasks = write_domain_tasks(layout, DOMAINS, tmp_path / "tasks", cache_dir=tmp_path / "ds")
    ev = params.evaluate
    for row, folder in [("public", layout.public_model), ("expert:beta", layout.expert("beta") / "model")]:
        direct = evaluate_model(folder, load_tokenizer_for(layout.public_model), tasks, limit=2,
                                batch_size=ev.batch_size, max_length=ev.max_length)
        for d in DOMAINS:
            assert metrics["bpb"][row][d] == pytest.approx(direct[d], abs=1e-5)
        raw = json.loads((layout.results / "lm_eval" / f"{row.replace(':', '-')}.json").read_text())
        assert "replayed_btm_member" in json.dumps(raw)


def test_replayed_member_refuses_a_document_btm_did_not_score():
    from lm_eval.api.instance import Instance

    from flexo.baselines import MemberReplayLM

    lm = MemberReplayLM("alpha", {"seen text": -12.5})
    req = lambda text: Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)  # noqa: E731
    assert lm.loglikelihood_rolling([req("seen text")]) == [-12.5]
    with pytest.raises(FlexoError, match="no recorded score"):
        lm.loglikelihood_rolling([req("unseen text")])


def test_bad_limit(evaluated):
    from stages.evaluate import evaluate

    layout, params, _, _ = evaluated
    with pytest.raises(FlexoError, match="limit"):
        evaluate(params, layout, limit=-1)


def test_missing_merged_model_is_a_one_line_error_and_writes_nothing(tiny_project):
    from stages.evaluate import evaluate

    params = load_params(tiny_project.params)
    with pytest.raises(FlexoError, match="flexo merge"):
        evaluate(params, tiny_project)
    assert not tiny_project.results.exists()


def test_reports_without_optouts(tmp_path):
    from stages.evaluate import plot_optout, render_optout

    full = {"public": 3.0, "alpha": 4.0}
    assert "No opt-out was evaluated" in render_optout({}, full, ["public", "alpha"], ["alpha"])
    plot_optout(tmp_path / "o.png", {}, full, ["public", "alpha"])
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"


def test_mixed_domain_suite_compares_token_routing_with_btm(evaluated):
    from flexo.mixed import mixed_documents

    layout, params, _, _ = evaluated
    mixed = json.loads((layout.results / "metrics.json").read_text())["mixed"]
    assert mixed["owners"] == ["alpha", "beta"]
    assert set(mixed["avg"]) == {"public", "flexolmo", "soup", "btm", "btm-top2", "prompt-routing"}  # the headline rows, no opt-outs
    for m, per_owner in mixed["bpb"].items():
        assert mixed["avg"][m] == pytest.approx(sum(per_owner.values()) / 2, abs=1e-6)
    c = mixed["comparisons"]["flexolmo - btm"]
    assert c["diff"] == pytest.approx(mixed["avg"]["flexolmo"] - mixed["avg"]["btm"], abs=1e-4)
    assert c["ci95"][0] <= c["ci95"][1] and "btm-top2 - btm" in mixed["comparisons"]
    # the documents alternate the owner's held-out text with public held-out text, half starting with each
    docs = mixed_documents("alpha", layout.heldout("alpha") / "test.jsonl", layout.heldout("public") / "test.jsonl")
    assert [d.sources[0] for d in docs[:2]] == ["alpha", "public"]
    assert all(d.sources[i] != d.sources[i + 1] for d in docs for i in range(len(d.sources) - 1))
    assert all(d.text[d.starts[1]:d.starts[1] + 20] for d in docs)
    # the routing trace: per bin, router probabilities and BTM's posterior each sum to 1
    trace = json.loads(layout.scores("alpha").read_text())["mixed"]["trace"]
    assert trace["sources"] == list(docs[0].sources) and trace["segment_bins"][0] == 0
    for row in trace["routers"]["flexolmo"]["probs"] + trace["btm"]["weights"]:
        assert sum(row) == pytest.approx(1, abs=0.01)
    assert len(trace["btm"]["weights"][0]) == 3 and "mixed:alpha" in (layout.results / "mixed.md").read_text()
    assert (layout.results / "mixed_routing.png").read_bytes()[:4] == b"\x89PNG"
