"""flexo.fsutil: guarded atomic outputs (never destroy), stale temps of dead writers, strict JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_dir, atomic_path, clean_stale_temps, read_json


def _guard(tmp_path, **kw) -> OutputGuard:
    # "same kind" = a folder holding kind.txt saying "thing"
    same = lambda p: (p / "kind.txt").is_file() and (p / "kind.txt").read_text() == "thing"  # noqa: E731
    return OutputGuard("thing", same, **kw)


def test_guard_allows_absent_empty_and_same_kind(tmp_path):
    g = _guard(tmp_path)
    g.check(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    g.check(tmp_path / "empty")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "kind.txt").write_text("thing")
    g.check(tmp_path / "old")


@pytest.mark.parametrize("setup, words", [
    (lambda t: (t / "f.txt").write_text("mine"), "it is a file"),
    (lambda t: ((t / "f.txt").mkdir(), (t / "f.txt" / "notes").write_text("mine")), "not an earlier thing"),
])
def test_guard_refuses_what_it_did_not_write(tmp_path, setup, words):
    setup(tmp_path)
    with pytest.raises(FlexoError, match=words):
        _guard(tmp_path).check(tmp_path / "f.txt")
    assert (tmp_path / "f.txt").exists()


def test_guard_refuses_inputs_their_parents_and_children_and_protected_folders(tmp_path):
    inp = tmp_path / "in" / "model"
    inp.mkdir(parents=True)
    g = _guard(tmp_path, inputs=(inp,), protected=(tmp_path / "data",))
    for bad, rel in ((inp, "is this command's input"), (tmp_path / "in", "contains"),
                     (inp / "sub", "lies inside"), (tmp_path / "data" / "x", "belongs to the project"),
                     (tmp_path, "contains")):
        with pytest.raises(FlexoError, match=rel):
            g.check(bad)
    with pytest.raises(FlexoError, match="top-level"):
        g.check(tmp_path.anchor)


def test_guard_refuses_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FlexoError, match="symbolic link"):
        _guard(tmp_path).check(tmp_path / "link")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_writers_go_live_ones_stay(tmp_path):
    dead = tmp_path / f".out.tmp-{_dead_pid()}-0123abcd"
    live = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"
    other = tmp_path / f".other.tmp-{_dead_pid()}-0123abcd"
    for p in (dead, live, other):
        p.mkdir()
    assert clean_stale_temps(tmp_path / "out") == [dead]
    assert live.exists() and other.exists() and not dead.exists()


def test_atomic_dir_replaces_only_after_success_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("half way")
    assert (out / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_with_dot_names_a_real_sibling(tmp_path, monkeypatch):
    """`--out .` resolves to the folder's own name: no `..tmp-*` sibling (and the guard refuses it first)."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "kind.txt").write_text("thing")
    monkeypatch.chdir(tmp_path / "proj")
    with atomic_dir(".", _guard(tmp_path)) as tmp:
        assert tmp.name.startswith(".proj.tmp-")
        (tmp / "kind.txt").write_text("thing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


def test_atomic_path_turns_a_full_disk_into_one_line(tmp_path):
    import errno

    with pytest.raises(FlexoError, match="no space left while writing .*f.bin"):
        with atomic_path(tmp_path / "f.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, words", [("null", "NoneType"), ('"x"', "str"), ("[1]", "list"),
                                         ("{", "not valid JSON"), ("[" * 100_000, "not valid JSON")])
def test_read_json_wants_an_object(tmp_path, text, words):
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(FlexoError, match=words):
        read_json(tmp_path / "m.json", "manifest")


def test_read_json_of_a_folder_says_folder(tmp_path):
    with pytest.raises(FlexoError, match="is a folder"):
        read_json(tmp_path, "manifest")
    assert json.loads('{"a": 1}') == read_json(_write(tmp_path / "ok.json", '{"a": 1}'), "manifest")


def _write(path, text):
    path.write_text(text)
    return path
