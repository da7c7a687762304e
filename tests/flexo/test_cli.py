"""flexo.cli: one subcommand per stage module, argparse's own exit 2 for a bad command line, and every
error a user can fix — a FlexoError, the disk — as exactly one `flexo: error:` line and exit 2."""

from __future__ import annotations

import argparse
import errno
import importlib
import json

import pytest

from conftest import TINY_PARAMS, run_cli
from flexo import cli


def subcommands(stage: str) -> list[str]:
    """The subcommand(s) stage module `stage` registers."""
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(f"stages.{stage}").add_cli(sub)
    return list(sub.choices)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "params.yaml").write_text(TINY_PARAMS)
    return tmp_path


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    names = [name for stage in cli.STAGES for name in subcommands(stage)]
    assert len(names) == len(cli.STAGES) == 18  # one subcommand per stage module
    assert {"curate", "train-expert", "audit-extraction", "opt-out", "router-tune", "status", "serve"} <= set(names)
    for name in names:
        assert f"    {name}" in out, name  # listed, with its help text
    assert "--root" in out and "--params" in out


def test_each_subcommand_is_mapped_to_the_module_that_declares_it():
    assert {name: stage for stage in cli.STAGES for name in subcommands(stage)} == cli.COMMANDS
    assert cli.command_module(["--root", "merge", "--params", "p.yaml", "opt-out", "--model", "m"]) == "optout"
    assert cli.command_module(["-v", "--help"]) is None and cli.command_module(["frobnicate"]) is None


def test_merge_and_opt_out_run_without_importing_torch(ctx, tmp_path):
    """The weight-moving commands import only their own stage module, and it moves bytes: neither torch
    nor transformers is loaded (a fresh interpreter running the real commands, as users run them)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    _, layout = ctx
    probe = ("import sys\nfrom flexo import cli\nrc = cli.main(sys.argv[1:])\n"
             "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\nsys.exit(rc)")
    runs = (["merge", "--out", str(tmp_path / "m")],
            ["opt-out", "--model", str(tmp_path / "m"), "--exclude", "alpha", "--out", str(tmp_path / "o")])
    for argv in runs:
        r = subprocess.run([sys.executable, "-c", probe, "--root", str(layout.root), *argv], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr[-800:]
        assert "HEAVY []" in r.stdout, (argv, r.stdout[-300:])
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_an_unknown_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([])  # a stage is required
    assert e.value.code == 2


def test_a_flexo_error_is_one_stderr_line_and_exit_2(tmp_path):
    rc, out, err = run_cli(["--root", str(tmp_path), "tokenizer"])  # no params.yaml there
    assert rc == 2 and out == ""
    assert err == f"flexo: error: params file {tmp_path.resolve()}/params.yaml not found: run flexo from the project " \
                  "root or pass --params\n"


def test_a_full_disk_is_one_no_space_left_line(root, monkeypatch):
    import stages.tokenizer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "models" / "tokenizer"))

    monkeypatch.setattr(stages.tokenizer, "train_tokenizer", full)
    rc, out, err = run_cli(["--root", str(root), "tokenizer"])
    assert rc == 2 and out == ""
    assert err == f"flexo: error: no space left writing {root}/models/tokenizer (No space left on device): free " \
                  "disk space (or raise the file-size limit) and rerun\n"


def test_other_os_errors_and_an_interrupt(root, monkeypatch):
    import stages.tokenizer

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/etc/x")

    monkeypatch.setattr(stages.tokenizer, "train_tokenizer", denied)
    rc, _, err = run_cli(["--root", str(root), "tokenizer"])
    assert (rc, err) == (2, "flexo: error: Permission denied: /etc/x: check the path and its permissions, then rerun\n")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.tokenizer, "train_tokenizer", interrupted)
    assert run_cli(["--root", str(root), "tokenizer"])[::2] == (130, "flexo: interrupted\n")
    assert cli.os_error_message(OSError("bare")) == "OSError: check the path and its permissions, then rerun"
    assert cli.os_error_message(OSError(errno.EDQUOT, "Disk quota exceeded")).startswith("no space left (")


def test_a_result_is_printed_as_json_and_timed(root, monkeypatch):
    import stages.tokenizer

    monkeypatch.setattr(stages.tokenizer, "train_tokenizer", lambda params, layout: {"vocab": 512, "owners": params.owners})
    rc, out, err = run_cli(["--root", str(root), "tokenizer"])
    assert rc == 0 and err == ""
    assert json.loads(out) == {"vocab": 512, "owners": ["alpha", "beta"]}
    timings = [json.loads(line) for line in (root / ".cache" / "timings.jsonl").read_text().splitlines()]
    assert [t["stage"] for t in timings] == ["process:tokenizer"] and timings[0]["wall_s"] >= 0
