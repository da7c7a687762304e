"""curate: real text in, disjoint deterministic splits and an exact manifest out; bad input refused.
(How later stages read the splits back, checked against the manifest, is tests/flexo/test_data.py.)"""

import json
import shutil

import pytest

from conftest import make_tiny_project, public_documents, run_cli
from flexo import sources
from flexo.errors import FlexoError
from flexo.layout import Layout
from flexo.params import load_params
from flexo.data import read_split
from stages.curate import Doc, chunk, clean_text, curate, split_of


@pytest.fixture
def project(tmp_path):
    root = make_tiny_project(tmp_path / "p")
    return Layout.at(root), load_params(root / "params.yaml")


def _rows(layout, name, split):
    return [json.loads(x) for x in layout.split_file(name, split).read_text().splitlines()]


def test_owner_splits_are_disjoint_deterministic_and_in_budget(project):
    layout, params = project
    m1 = curate("alpha", params, layout)
    first = {s: layout.split_file("alpha", s).read_bytes() for s in ("train", "val", "test")}
    m2 = curate("alpha", params, layout)
    assert {s: layout.split_file("alpha", s).read_bytes() for s in ("train", "val", "test")} == first
    assert m1["splits"] == m2["splits"]
    texts = {s: {r["text"] for r in _rows(layout, "alpha", s)} for s in ("train", "val", "test")}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
    # short source documents never straddle two splits
    origins = {s: {r["origin"] for r in _rows(layout, "alpha", s) if "@" not in r["origin"]} for s in ("train", "test")}
    assert not origins["train"] & origins["test"]
    assert m1["splits"]["train"]["characters"] <= params.curate.owner_train_chars
    assert all(len(t) >= params.curate.min_doc_chars for t in texts["train"])
    assert m1["inbox"]["documents"] == m1["inbox"]["files"] == len(list(layout.owner_inbox("alpha").glob("*.txt")))
    # the test split lives apart from what the owner trains on
    assert (layout.heldout("alpha") / "test.jsonl").is_file()
    assert not (layout.curated("alpha") / "test.jsonl").exists()


def test_owner_splits_hold_real_inbox_text(project):
    layout, params = project
    curate("alpha", params, layout)
    train = read_split(layout, "alpha", "train")
    assert any("def " in t and "import" in t for t in train)  # real stdlib code, not filler


def test_non_utf8_and_binary_files_are_skipped_and_counted(project):
    layout, params = project
    inbox = layout.owner_inbox("alpha")
    (inbox / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    (inbox / "blob.txt").write_bytes(b"\x00\x01\x02binary" * 50)
    (inbox / "ignored.bin").write_bytes(b"\xff" * 10)
    m = curate("alpha", params, layout)
    assert m["inbox"]["skipped_files"] == 2
    assert sorted(m["inbox"]["skipped"]) == ["blob.txt", "latin1.txt"]


def test_duplicates_are_dropped(project):
    layout, params = project
    inbox = layout.owner_inbox("alpha")
    src = sorted(inbox.glob("*.txt"))[0]
    shutil.copy(src, inbox / "copy_of_first.txt")
    (inbox / "respaced.txt").write_text("  ".join(src.read_text().split(" ")))
    m = curate("alpha", params, layout)
    assert m["dropped"]["duplicate"] >= 1
    assert m["dropped"]["near_duplicate"] + m["dropped"]["duplicate"] >= 2


def test_owner_without_documents_is_refused_and_writes_nothing(project, tmp_path):
    layout, params = project
    shutil.rmtree(layout.owner_inbox("beta"))
    layout.owner_inbox("beta").mkdir()
    with pytest.raises(FlexoError, match="owner 'beta' has no documents"):
        curate("beta", params, layout)
    assert not layout.curated("beta").exists()


def test_source_that_yields_nothing_is_refused(project, monkeypatch):
    layout, params = project

    def no_docs(source_id, cache_dir, **kw):
        return iter(())

    monkeypatch.setattr(sources, "fetch", lambda sid, cache: (cache, _FakeRecord()))
    monkeypatch.setattr(sources, "iter_documents", no_docs)
    with pytest.raises(FlexoError, match="yielded no documents"):
        curate("public", params, layout)
    assert not layout.curated("public").exists()


class _FakeRecord:
    def to_dict(self):
        return {"source_id": "fake"}


def test_crash_half_way_leaves_no_output(project):
    layout, params = project

    def exploding():
        yield from public_documents()[:5]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        curate("public", params, layout, documents=exploding())
    assert not layout.curated("public").exists()
    assert not list(layout.curated("public").parent.glob(".*tmp*")) if layout.curated("public").parent.exists() else True


def test_cli_refuses_unknown_and_malformed_owner(project):
    layout, _ = project
    rc, _, err = run_cli(["--root", str(layout.root), "curate", "--owner", "../x"])
    assert rc == 2 and "'../x' is not allowed" in err
    rc, _, err = run_cli(["--root", str(layout.root), "curate", "--owner", "legal"])
    assert rc == 2 and "unknown owner 'legal'" in err and err.count("\n") == 1


def test_cleaning_keeps_code_indentation_and_drops_control_chars():
    text = "def f():\r\n    return 1   \n\n\n\n\x07x = 2\t\n"
    assert clean_text(text) == "def f():\n    return 1\n\nx = 2"


def test_chunks_respect_the_size_and_keep_all_text():
    text = "\n\n".join(f"paragraph {i} " + "word " * 40 for i in range(30))
    pieces = chunk(text, 500)
    assert all(len(p) <= 520 for p in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())


def test_split_is_a_pure_function_of_the_origin():
    assert split_of("src:a", 0.1, 0.1) == split_of("src:a", 0.1, 0.1)
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(2000):
        counts[split_of(f"s:{i}", 0.1, 0.1)] += 1
    assert 150 < counts["test"] < 250 and 150 < counts["val"] < 250


def test_flexmix_domains_all_have_sources():
    for domain in ("news", "creative", "code", "academic", "educational", "math", "reddit", "public"):
        assert sources.DOMAIN_SOURCES[domain], domain
    docs = [Doc("x", "s", "o")]
    assert docs[0].origin == "o"


def test_line_separators_inside_a_text_survive_the_round_trip(tmp_path):
    """U+2028 and U+0085 are kept by cleaning and written raw into the JSONL; reading splits on "\\n" only."""
    root = make_tiny_project(tmp_path / "p")
    layout = Layout.at(root)
    inbox = layout.owner_inbox("alpha")
    shutil.rmtree(inbox)
    inbox.mkdir()
    for i in range(12):  # only these documents, so none is cut by the budget
        sep = "\u2028" if i % 2 else "\x85"
        (inbox / f"odd{i}.txt").write_text(f"document {i}: first part{sep}second part of the paragraph " * 20,
                                           encoding="utf-8")
    with open(inbox / "nested.jsonl", "w") as f:  # a line too deeply nested to parse is skipped, not a crash
        f.write("[" * 100_000 + "\n" + json.dumps({"text": "a fine line " * 30}) + "\n")
    params = load_params(layout.params)
    manifest = curate("alpha", params, layout)
    assert manifest["inbox"]["skipped_lines"] == 1
    texts = [t for s in ("train", "val", "test") for t in read_split(layout, "alpha", s)]
    assert any("\u2028" in t for t in texts) and any("\x85" in t for t in texts)
    assert any(t.startswith("a fine line") for t in texts)
