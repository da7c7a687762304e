"""Crash safety: a stage killed with SIGKILL half way leaves nothing a later stage (or DVC) could take for a
finished output, and rerunning the same command completes with the result of an uninterrupted run.

The killed runs are real `flexo` processes (`flexo.cli.main`, started with `python -c`): the only thing
the test adds is a short pause inside the process (a slower learning-rate lookup, or a pause after the
first shard / split is written) so that the kill lands half way on any machine. The kill itself is a real
SIGKILL: no handler, no clean-up code runs. In-process exceptions half way are tested as well.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cli_env, copy_project, flexo_command, tree
from flexo.fsutil import sha256_file
from flexo.params import load_params

RUN_CLI = "import sys, time\nimport flexo.cli\n{patch}\nfrom flexo.cli import main\nsys.exit(main(sys.argv[1:]))\n"
# 0.25 s more per optimizer step (the learning-rate lookup runs once per step).
SLOW_STEPS = ("import flexo.training as T\n_lr = T.lr_at\n"
              "T.lr_at = lambda *a: (time.sleep(0.25), _lr(*a))[1]")
# Hang (until killed) right after the merge writes its first shard into its temp folder.
HANG_AFTER_FIRST_SHARD = ("import stages.merge as M\n_flush = M.ShardWriter.flush\n"
                          "def flush(self):\n    _flush(self)\n    time.sleep(600)\n"
                          "M.ShardWriter.flush = flush")
# Hang (until killed) once curate has written the held-out split and train.jsonl into its temp folder.
HANG_AFTER_TRAIN_SPLIT = ("import stages.curate as C\n_write = C._write_split\ncalls = []\n"
                          "def write(*a, **k):\n    _write(*a, **k)\n    calls.append(1)\n"
                          "    if len(calls) == 2:\n        time.sleep(600)\n"
                          "C._write_split = write")


def start(root: Path, argv: list[str], patch: str, log: Path, **env: str) -> subprocess.Popen:
    """`flexo --root ROOT ARGV` in a new process with `patch` applied first; output goes to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", RUN_CLI.format(patch=patch), "--root", str(root), *argv],
                                cwd=REPO, env=cli_env(**env), stdout=f, stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    """Poll `ready()` every 10 ms; SIGKILL the process as soon as it holds."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before it could be killed:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for the kill point:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def flexo(root: Path, *argv: str) -> subprocess.CompletedProcess:
    """`flexo --root ROOT ARGV` with the installed console script (what users, DVC and the flows run)."""
    r = subprocess.run([*flexo_command(), "--root", str(root), *argv], cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def temps(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.tmp-"))


# ------------------------------------------------------------------------------------------- training
def test_training_killed_resumes_from_its_checkpoint_to_the_same_expert(tiny_project, tmp_path):
    layout = copy_project(tiny_project, tmp_path / "project").layout
    params = load_params(layout.params)
    reference = load_file(tiny_project.expert("alpha") / "expert.safetensors")  # the uninterrupted run
    shutil.rmtree(layout.expert("alpha"))
    state = layout.checkpoints("expert-alpha") / "state.json"

    log = tmp_path / "killed.log"
    proc = start(layout.root, ["train-expert", "--owner", "alpha"], SLOW_STEPS, log)
    kill_when(proc, state.is_file, log)
    step = json.loads(state.read_text())["step"]
    assert 0 < step < params.train_expert.max_steps and step % params.train_expert.checkpoint_every == 0
    assert not layout.expert("alpha").exists()
    assert not temps(layout.expert("alpha").parent, "alpha")

    r = flexo(layout.root, "train-expert", "--owner", "alpha")
    assert f"resuming train-expert alpha from step {step}" in r.stderr
    resumed = load_file(layout.expert("alpha") / "expert.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert json.loads(r.stdout)["steps"] == params.train_expert.max_steps
    assert not layout.checkpoints("expert-alpha").exists()  # dropped once the output is complete


# ---------------------------------------------------------------------------------------------- merge
def test_merge_killed_half_way_leaves_no_output_and_a_rerun_ignores_the_temp(tiny_project, tmp_path):
    from stages.merge import merge

    layout = copy_project(tiny_project, tmp_path / "project").layout
    clean = tmp_path / "clean"
    merge(load_params(tiny_project.params), tiny_project, out=clean)  # an uninterrupted merge, elsewhere

    log = tmp_path / "killed.log"
    proc = start(layout.root, ["merge"], HANG_AFTER_FIRST_SHARD, log)
    models = layout.root / "models"
    kill_when(proc, lambda: any(models.glob(".merged.tmp-*/.shard-*.partial")), log)
    assert not layout.merged.exists()
    stale = temps(models, "merged")
    assert len(stale) == 1 and [p.name for p in models.iterdir() if "merged" in p.name] == stale

    flexo(layout.root, "merge")
    got, want = tree(layout.merged), tree(clean)
    assert got.keys() == want.keys()  # no stray .partial shard either
    assert got == want  # bit-identical to the uninterrupted merge, flexo.json included (no timings in it)
    assert json.loads((layout.merged / "flexo.json").read_text())["experts"] == ["public", "alpha", "beta"]
    assert temps(models, "merged") == []  # the dead run's temp folder was removed, not picked up


# Both processes pause just before the swap (the renames that put the new folder in place) until the test
# says go, so that they finish at the same moment.
PAUSE_BEFORE_SWAP = ("import os, flexo.fsutil as F\n_lock = F._swap_lock\n"
                     "def lock(folder):\n    open(os.environ['FLEXO_TEST_READY'] + f'/{{os.getpid()}}', 'w').close()\n"
                     "    while not os.path.exists(os.environ['FLEXO_TEST_GO']):\n        time.sleep(0.01)\n"
                     "    return _lock(folder)\nF._swap_lock = lock")


def test_two_merges_finishing_together_take_turns_and_leave_no_temp(tiny_project, tmp_path):
    from stages.merge import merge

    layout = copy_project(tiny_project, tmp_path / "project").layout
    clean = tmp_path / "clean"
    merge(load_params(tiny_project.params), tiny_project, out=clean)
    ready, go = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    procs = [start(layout.root, ["merge"], PAUSE_BEFORE_SWAP.format(), tmp_path / f"m{i}.log",
                   FLEXO_TEST_READY=str(ready), FLEXO_TEST_GO=str(go)) for i in range(2)]
    deadline = time.time() + 300
    while len(list(ready.iterdir())) < 2 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    assert len(list(ready.iterdir())) == 2, [(tmp_path / f"m{i}.log").read_text()[-2000:] for i in range(2)]
    go.touch()
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"m{i}.log").read_text()[-3000:]
    assert tree(layout.merged) == tree(clean)
    assert temps(layout.root / "models", "merged") == []


def test_merge_failing_half_way_in_process_leaves_nothing(tiny_project, tmp_path, monkeypatch):
    import stages.merge as merge_mod

    layout = copy_project(tiny_project, tmp_path / "project").layout
    params = copy.deepcopy(load_params(layout.params))
    params.merge.shard_bytes = 100_000  # several shards (below the params.yaml minimum on purpose)
    real, calls = merge_mod.ShardWriter.flush, []

    def flush_then_fail(self):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real(self)

    monkeypatch.setattr(merge_mod.ShardWriter, "flush", flush_then_fail)
    with pytest.raises(OSError, match="No space"):
        merge_mod.merge(params, layout)
    assert len(calls) == 2 and not layout.merged.exists()
    assert not temps(layout.merged.parent, "merged")  # an exception (unlike SIGKILL) cleans its temp up
    monkeypatch.setattr(merge_mod.ShardWriter, "flush", real)
    assert merge_mod.merge(params, layout)["shards"] >= 2


# --------------------------------------------------------------------------------------------- curate
def test_curate_killed_half_way_keeps_the_previous_complete_version(tiny_project, tmp_path):
    layout = copy_project(tiny_project, tmp_path / "project").layout
    before = tree(layout.curated("alpha"))
    (layout.owner_inbox("alpha") / "extra.txt").write_text("An extra document the killed run never finishes. " * 20)

    log = tmp_path / "killed.log"
    proc = start(layout.root, ["curate", "--owner", "alpha"], HANG_AFTER_TRAIN_SPLIT, log)
    curated = layout.curated("alpha").parent
    kill_when(proc, lambda: any(curated.glob(".alpha.tmp-*/train.jsonl")), log)
    assert tree(layout.curated("alpha")) == before  # the previous complete version, untouched
    assert len(temps(curated, "alpha")) == 1

    flexo(layout.root, "curate", "--owner", "alpha")
    after = tree(layout.curated("alpha"))
    assert set(after) == {"train.jsonl", "val.jsonl", "manifest.json"}
    manifest = json.loads((layout.curated("alpha") / "manifest.json").read_text())
    old = json.loads((tiny_project.curated("alpha") / "manifest.json").read_text())
    assert manifest["inbox"]["files"] == old["inbox"]["files"] + 1  # the rerun's output, complete
    assert manifest["splits"]["train"]["sha256"] == sha256_file(layout.curated("alpha") / "train.jsonl")


def test_curate_killed_on_a_fresh_owner_leaves_no_output(tiny_project, tmp_path):
    layout = copy_project(tiny_project, tmp_path / "project").layout
    shutil.rmtree(layout.curated("alpha"))
    shutil.rmtree(layout.heldout("alpha"))
    log = tmp_path / "killed.log"
    proc = start(layout.root, ["curate", "--owner", "alpha"], HANG_AFTER_TRAIN_SPLIT, log)
    curated = layout.curated("alpha").parent
    kill_when(proc, lambda: any(curated.glob(".alpha.tmp-*/train.jsonl")), log)
    assert not layout.curated("alpha").exists()
    flexo(layout.root, "curate", "--owner", "alpha")
    assert (layout.curated("alpha") / "manifest.json").is_file()
    for split in ("train", "val"):  # the same splits as the fixture's uninterrupted curate
        assert (layout.curated("alpha") / f"{split}.jsonl").read_bytes() == \
            (tiny_project.curated("alpha") / f"{split}.jsonl").read_bytes()


def test_curate_failing_half_way_in_process_leaves_no_curated_folder(tiny_project, tmp_path, monkeypatch):
    import stages.curate as curate_mod

    layout = copy_project(tiny_project, tmp_path / "project").layout
    shutil.rmtree(layout.curated("alpha"))
    real, calls = curate_mod._write_split, []

    def write_then_fail(*a, **k):
        real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")

    monkeypatch.setattr(curate_mod, "_write_split", write_then_fail)
    with pytest.raises(OSError):
        curate_mod.curate("alpha", load_params(layout.params), layout)
    assert not layout.curated("alpha").exists() and not temps(layout.curated("alpha").parent, "alpha")
