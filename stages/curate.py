"""Stage `curate`: real text for one data owner (or `public`) → deduplicated train/val/test splits.

    flexo curate --owner public
    flexo curate --owner code

Reads the owner's packaged sources (flexo.sources, fetched into the project's download cache) and the
owner's own folder `data/owners/<owner>/`, cleans, deduplicates, splits by document hash and caps the
train split to the budget in params. Writes `data/curated/<name>/{train,val,test}.jsonl` and
`manifest.json`. An owner's curate reads only that owner's sources; public curate reads only public ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from flexo import sources, timings
from flexo.data import SPLITS
from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_dir, read_json, sha256_file
from flexo.layout import Layout
from flexo.params import PUBLIC, Params
from flexo.project import stage_command
from flexo.tokenization import count_tokens, load_tokenizer

log = logging.getLogger(__name__)

INBOX_SUFFIXES = (".txt", ".jsonl")
SPLIT_RUN = 4  # consecutive pieces of one document that always share a split


@dataclass
class Doc:
    text: str
    source_id: str
    origin: str


# ---------------------------------------------------------------------------------------------- cleaning
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalise without destroying code: NFC, unix newlines, no control chars, no trailing spaces,
    at most one blank line in a row. Indentation is kept (it is syntax in the code domain)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip("\n").strip()


def _exact_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


_NON_WORD = re.compile(r"[\W_]+")


def _near_key(text: str) -> str:
    # Cheap near-duplicate key: words only (no punctuation), case-folded, first ~1 kB. Catches re-spaced and
    # re-punctuated copies (e.g. the same play in two packages) without a MinHash index; digits are kept, since
    # generated math problems differ only in their numbers.
    letters = _NON_WORD.sub(" ", text.lower()).split()
    return hashlib.sha256(" ".join(letters)[:1000].encode()).hexdigest()


def split_of(origin_key: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split by the hash of a document's origin: every piece of one document lands in one split."""
    u = int(hashlib.sha256(origin_key.encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def chunk(text: str, max_chars: int) -> list[str]:
    """Cut a long document at paragraph (then line) breaks into pieces of at most ~max_chars."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for para in re.split(r"(\n\n)", text):
        if len(current) + len(para) > max_chars and current.strip():
            pieces.append(current)
            current = ""
        if len(para) > max_chars:  # one huge paragraph (code, verse): fall back to lines
            for line in para.split("\n"):
                if len(current) + len(line) + 1 > max_chars and current.strip():
                    pieces.append(current)
                    current = ""
                current += line[: max_chars * 2] + "\n"
        else:
            current += para
    if current.strip():
        pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


# ------------------------------------------------------------------------------------------ owner inbox
@dataclass
class InboxReport:
    files: int = 0
    documents: int = 0
    skipped_files: int = 0
    skipped: list[str] | None = None
    skipped_links: int = 0  # symbolic and hard links in the inbox: never read
    skipped_lines: int = 0  # .jsonl lines that are not a JSON object with a string `text`


def _inbox_files(folder: Path, report: InboxReport) -> Iterator[tuple[Path, str]]:
    """(path, relative name) of every regular file under `folder`, in name order, never through a link.

    A symbolic link — to a file or a folder, inside the project or not — is skipped with a warning and
    counted: an owner's stage reads only what lies in its own folder (a link to another owner's curated
    split or to /etc/passwd would otherwise become this owner's training text). A file name that is not
    UTF-8 is skipped the same way (it could not be recorded in the manifest)."""
    root = folder.resolve()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                _skip_link(here / name, folder, report)
        dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink())
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                _skip_link(path, folder, report)
                continue
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                log.warning("skipping %s: its file name is not UTF-8", shown)
                report.skipped_files += 1
                report.skipped.append(shown)
                continue
            if name.startswith(".") or path.suffix not in INBOX_SUFFIXES or not path.is_file():
                continue
            if root not in path.resolve().parents:  # belt and braces: nothing outside the folder is read
                _skip_link(path, folder, report)
                continue
            if path.stat().st_nlink > 1:
                # A hard link is another name of a file that also lives elsewhere — possibly another owner's
                # curated split; an owner's folder must hold its own copies.
                log.warning("skipping %s: a hard link (the file has %d names); copy the file instead", path,
                            path.stat().st_nlink)
                report.skipped_links += 1
                report.skipped.append(rel)
                continue
            yield path, rel


def _skip_link(path: Path, folder: Path, report: InboxReport) -> None:
    rel = path.relative_to(folder).as_posix()
    log.warning("skipping %s: a symbolic link (to %s); an owner's folder must hold the files themselves",
                path, os.readlink(path) if path.is_symlink() else "outside the folder")
    report.skipped_links += 1
    report.skipped.append(rel)


def inbox_folder(layout: Layout, owner: str) -> Path:
    """`data/owners/<owner>/`, refused if it is itself a link (it would read another folder's text)."""
    folder = layout.owner_inbox(owner)
    if folder.is_symlink():
        raise FlexoError(f"{folder} is a symbolic link (to {os.readlink(folder)}): an owner's folder must be a "
                         "real folder holding that owner's own documents; replace the link with the files")
    if folder.exists() and not folder.is_dir():
        raise FlexoError(f"{folder} is a file, not a folder: put {owner}'s documents into a folder of that name")
    return folder


def read_inbox(folder: Path) -> tuple[list[Doc], InboxReport]:
    """An owner's own documents: `*.txt` (one file = one document) and `*.jsonl` (a `text` field per line).
    Binary or non-UTF-8 files and symbolic links are skipped with a warning and counted, never a crash."""
    report = InboxReport(skipped=[])
    docs: list[Doc] = []
    if not folder.is_dir():
        return docs, report
    for path, rel in _inbox_files(folder, report):
        report.files += 1
        raw = path.read_bytes()
        try:
            if b"\x00" in raw:
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "binary file (NUL bytes)")
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            log.warning("skipping %s: not UTF-8 text (%s)", path, e.reason)
            report.skipped_files += 1
            report.skipped.append(rel)
            continue
        if path.suffix == ".txt":
            docs.append(Doc(text, "inbox", rel))
            continue
        for i, line in enumerate(text.split("\n")):  # not splitlines: U+2028 may sit inside a JSON string
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                body = row["text"]
                if not isinstance(body, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                log.warning("skipping %s line %d: not a JSON object with a string `text` field", path, i + 1)
                report.skipped_lines += 1
                continue
            docs.append(Doc(body, "inbox", f"{rel}#{i}"))
    report.documents = len(docs)
    return docs, report


# ------------------------------------------------------------------------------------------------ stage
def _packaged_docs(domain: str, cache: Path, char_budget: int, seed: int) -> tuple[Iterator[Doc], list]:
    """A domain's packaged documents: an equal share of the budget per source first, then whatever a
    short source could not fill goes to the sources that still have text (a second, resumed pass)."""
    ids = sources.DOMAIN_SOURCES.get(domain, ())
    records: list[dict] = []

    def gen() -> Iterator[Doc]:
        share = char_budget // max(1, len(ids))
        taken = {sid: [0, 0] for sid in ids}  # documents, characters
        for sid in ids:
            _, record = sources.fetch(sid, cache)
            records.append(record.to_dict())
            for raw in sources.iter_documents(sid, cache, seed=seed, max_chars=share):
                taken[sid][0] += 1
                taken[sid][1] += len(raw.text)
                yield Doc(raw.text, raw.source_id, raw.origin)
            if taken[sid][0] == 0:
                raise FlexoError(
                    f"source {sid!r} ({domain}) yielded no documents: delete {cache} to refetch it, "
                    "or remove it from flexo.sources.DOMAIN_SOURCES"
                )
        for sid in ids:
            deficit = char_budget - sum(c for _, c in taken.values())
            if deficit <= 0 or taken[sid][1] < share:  # budget met, or this source is exhausted
                continue
            skip, chars = taken[sid]
            for i, raw in enumerate(sources.iter_documents(sid, cache, seed=seed, max_chars=chars + deficit)):
                if i >= skip:  # iter_documents is deterministic: the first `skip` were yielded already
                    taken[sid][1] += len(raw.text)
                    yield Doc(raw.text, raw.source_id, raw.origin)

    return gen(), records


def curate(name: str, params: Params, layout: Layout, *, documents: Iterable[Doc] | None = None) -> dict:
    """Curate `name` (an owner from params.yaml, or `public`) and return its manifest.

    An owner's splits are counted in tokens of the project's tokenizer (the public split is what the
    tokenizer is trained on, so it is counted by the tokenizer stage). `documents` replaces the
    packaged sources (tests use it to build a tiny project without downloads).
    """
    params.check_owner(name, allow_public=True)
    c = params.curate
    started = time.time()
    token_counter = None
    if name != PUBLIC and (layout.tokenizer / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(layout)
        token_counter = lambda texts: count_tokens(tokenizer, texts)  # noqa: E731
    train_budget = c.public_train_chars if name == PUBLIC else c.owner_train_chars
    # Fetch enough raw text for the train budget plus val/test and what cleaning drops.
    raw_budget = int((train_budget + 2 * c.max_eval_chars) * 1.3)

    if documents is None:
        packaged, records = _packaged_docs(name, layout.downloads, raw_budget, seed=0)
    else:
        packaged, records = iter(documents), [{"source_id": "given", "note": "documents passed by the caller"}]
    heldout_guard, curated_guard = split_guards(name)
    heldout_guard.check(layout.heldout(name))
    curated_guard.check(layout.curated(name))
    inbox_docs, inbox = ([], InboxReport(skipped=[])) if name == PUBLIC else read_inbox(inbox_folder(layout, name))
    if name != PUBLIC and documents is None and name not in sources.DOMAIN_SOURCES and not inbox_docs:
        raise FlexoError(
            f"owner {name!r} has no documents: it is not a FlexMix domain ({', '.join(sources.DOMAINS)}) and "
            f"{layout.owner_inbox(name)} holds no readable .txt or .jsonl files; add some"
        )

    buckets: dict[str, list[dict]] = {s: [] for s in SPLITS}
    seen_exact: set[str] = set()
    seen_near: set[str] = set()
    dropped = {"tiny": 0, "duplicate": 0, "near_duplicate": 0}
    stream: Iterable[Doc] = list(inbox_docs) + []  # the owner's own documents come first: never cut by the budget
    bar = tqdm(desc=f"curate {name}", unit="doc", mininterval=1.0)
    for doc in _chain(stream, packaged):
        bar.update()
        text = clean_text(doc.text)
        for i, piece in enumerate(chunk(text, c.chunk_chars)):
            # Split by origin in runs of a few pieces: a short document stays whole in one split, and a
            # long one (a play, a speech) still spreads over all three instead of landing whole in one.
            split = split_of(f"{doc.source_id}:{doc.origin}#{i // SPLIT_RUN}", c.val_fraction, c.test_fraction)
            if len(piece) < c.min_doc_chars:
                dropped["tiny"] += 1
                continue
            k = _exact_key(piece)
            if k in seen_exact:
                dropped["duplicate"] += 1
                continue
            seen_exact.add(k)
            if c.near_dedup:
                nk = _near_key(piece)
                if nk in seen_near:
                    dropped["near_duplicate"] += 1
                    continue
                seen_near.add(nk)
            origin = doc.origin if i == 0 else f"{doc.origin}@{i}"
            buckets[split].append({"text": piece, "source": doc.source_id, "origin": origin})
    bar.close()

    for split in ("val", "test"):
        # A small owner can hash no document into val or test: lend one from train rather than fail.
        if not buckets[split] and len(buckets["train"]) >= 3:
            buckets[split].append(buckets["train"].pop())
            log.warning("curate %s: no document hashed into %s; moved one from train", name, split)
    caps = {"train": train_budget, "val": c.max_eval_chars, "test": c.max_eval_chars}
    for split in SPLITS:
        buckets[split] = _cap(buckets[split], caps[split])
    for split in SPLITS:
        if not buckets[split]:
            raise FlexoError(
                f"curate {name}: the {split} split is empty ({sum(map(len, buckets.values()))} documents in all): "
                f"add documents to {layout.owner_inbox(name)} or lower curate.val_fraction/test_fraction"
            )

    stats = {}
    # The test split goes to data/heldout/<name>/ first: a crash between the two renames leaves the
    # curated folder missing, so DVC reruns the stage rather than pairing a new test split with old data.
    with atomic_dir(layout.heldout(name), heldout_guard) as held:
        _write_split(held / "test.jsonl", buckets["test"], stats, "test", token_counter)
    with atomic_dir(layout.curated(name), curated_guard) as tmp:
        for split in ("train", "val"):
            _write_split(tmp / f"{split}.jsonl", buckets[split], stats, split, token_counter)
        stats = {s: stats[s] for s in SPLITS}
        by_source: dict[str, int] = {}
        for split in SPLITS:
            for r in buckets[split]:
                by_source[r["source"]] = by_source.get(r["source"], 0) + 1
        manifest = {
            "name": name,
            "sources": records,
            "inbox": {
                "folder": f"data/owners/{name}" if name != PUBLIC else None,
                "files": inbox.files,
                "documents": inbox.documents,
                "skipped_files": inbox.skipped_files,
                "skipped_links": inbox.skipped_links,
                "skipped_lines": inbox.skipped_lines,
                "skipped": inbox.skipped,
            },
            "documents_by_source": by_source,
            "splits": stats,
            "dropped": dropped,
            "params": {k: getattr(c, k) for k in c.__dataclass_fields__},
            "train_budget_chars": train_budget,
            "tokens_note": None if token_counter else "counted by the tokenizer stage (models/tokenizer/manifest.json)",
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    timings.record(layout.root, f"curate@{name}", wall_s=round(time.time() - started, 1))
    log.info("curated %s: %s", name, {s: stats[s]["documents"] for s in SPLITS})
    return manifest


def split_guards(name: str) -> tuple[OutputGuard, OutputGuard]:
    """What curate may replace: an earlier held-out folder (test.jsonl only) and an earlier curated folder
    of the same owner (its manifest names it)."""
    def heldout(path: Path) -> bool:
        return path.is_dir() and {p.name for p in path.iterdir()} <= {"test.jsonl"}

    def curated(path: Path) -> bool:
        try:
            return read_json(path / "manifest.json", what="curated manifest").get("name") == name
        except FlexoError:
            return False

    command = f"flexo curate --owner {name}"
    return (OutputGuard(f"held-out split of {name!r}", heldout, command=command, files=("test.jsonl",)),
            OutputGuard(f"curated splits of {name!r}", curated, command=command,
                        files=("train.jsonl", "val.jsonl", "manifest.json")))


def _write_split(path: Path, rows: list[dict], stats: dict, split: str, token_counter) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    texts = [r["text"] for r in rows]
    stats[split] = {
        "documents": len(texts),
        "characters": sum(map(len, texts)),
        "tokens": token_counter(texts) if token_counter else None,
        "sha256": sha256_file(path),
    }


def _chain(first: Iterable[Doc], second: Iterable[Doc]) -> Iterator[Doc]:
    yield from first
    yield from second


def _cap(rows: list[dict], max_chars: int) -> list[dict]:
    """Keep a deterministic, hash-ordered subset within the character budget (inbox rows first)."""
    ordered = sorted(rows, key=lambda r: (r["source"] != "inbox", hashlib.sha256(r["text"].encode()).hexdigest()))
    kept, total = [], 0
    for r in ordered:
        if total + len(r["text"]) > max_chars and kept:
            break
        kept.append(r)
        total += len(r["text"])
    return kept


def add_cli(sub) -> None:
    stage_command(sub, "curate", "curate one owner's (or the public) text into train/val/test splits",
                  lambda args, project: curate(args.owner, project.params, project.layout),
                  owner="an owner from params.yaml, or `public`")
