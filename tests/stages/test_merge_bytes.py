"""The byte-level merge and opt-out (flexo/weights.py: no torch, no deserialising) write the same bytes as
the torch-based ones they replaced: every file of the merged model (one shard and several), of a plain
opt-out and of an opt-out of the router-tuned model (router refit), compared with the code at BEFORE run
on the same inputs. One difference is a fix: BEFORE's opt-out of the router-tuned model read every
`*.safetensors` of the folder as weights, so the embedded router statistics and refits (the withdrawn
owner's among them) were copied into the opted-out model's weights file."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

from conftest import REPO, copy_project, run_cli, tree

BEFORE = "b6dd0bd"  # the last commit whose merge and opt-out went through torch and transformers


def _old_code(dst):
    """flexo/ and stages/ as they were at BEFORE (from the repository's own history)."""
    try:
        data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", BEFORE, "flexo", "stages"],
                              capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"the history at {BEFORE} is not in this checkout ({e}): a shallow clone cannot run this test")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dst, filter="data")
    return dst


CLI = "import sys; from flexo.cli import main; sys.exit(main(sys.argv[1:]))"
# The merge in shards of 100 kB (params.yaml allows no less than 1 MB, more than the tiny model): several
# files and an index.
SHARDED = ("import sys; from flexo.layout import Layout; from flexo.params import load_params; "
           "from stages.merge import merge; layout = Layout.at(sys.argv[1]); params = load_params(layout.params); "
           "params.merge.shard_bytes = 100_000; merge(params, layout, out=sys.argv[2])")


def _run(code, program, *argv):
    # Run from `code` itself: `python -c` puts the working directory first on sys.path, so from the
    # repository root the new code would be imported whatever PYTHONPATH says.
    r = subprocess.run([sys.executable, "-c", "import flexo\nprint('CODE', flexo.__file__)\n" + program, *argv],
                       capture_output=True, text=True, cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
    assert r.returncode == 0, r.stderr[-1500:]
    assert f"CODE {code}" in r.stdout, (code, r.stdout[-300:])  # the code meant ran, not another checkout


def test_merge_and_opt_out_write_the_bytes_the_torch_based_code_wrote(tiny_project, tmp_path):
    project = copy_project(tiny_project, tmp_path / "p")
    root = project.root
    # params.yaml sections added after BEFORE (which refuses unknown keys) and read by neither merge nor opt-out
    raw = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if k not in ("benchmark",)}))
    old = _old_code(tmp_path / "old")
    runs = {
        "merge": (CLI, "--root", str(root), "merge", "--out", "{out}"),
        "merge-sharded": (SHARDED, str(root), "{out}"),
        "opt-out": (CLI, "--root", str(root), "opt-out", "--model", str(root / "models" / "merged"), "--exclude",
                    "alpha", "--out", "{out}"),
        "opt-out-rt": (CLI, "--root", str(root), "opt-out", "--model", str(root / "models" / "merged-rt"),
                       "--exclude", "beta", "--out", "{out}"),
    }
    # The inputs: the pipeline's merged and router-tuned models.
    for argv in (["merge"], ["router-update", "--owner", "alpha"], ["router-update", "--owner", "beta"],
                 ["router-tune"]):
        r = run_cli(["--root", str(root), *argv])
        assert r.rc == 0, r.err
    for name, (program, *argv) in runs.items():
        outs = {}
        for who, code in (("old", old), ("new", REPO)):
            out = tmp_path / f"{name}-{who}"
            _run(code, program, *[a.replace("{out}", str(out)) for a in argv])
            outs[who] = tree(out)
        _same_card(tmp_path / f"{name}-old", tmp_path / f"{name}-new", outs)
        if name == "opt-out-rt":
            _same_but_the_leak(tmp_path / f"{name}-old", tmp_path / f"{name}-new", outs)
        else:
            assert outs["old"] == outs["new"], name
        if name == "merge-sharded":
            assert "model.safetensors.index.json" in outs["new"] and len(outs["new"]) > 8, outs["new"]
    shutil.rmtree(old)


SERVE_LINES = 5  # the model card's paragraph on `flexo serve` (after a blank line), added after BEFORE


def _same_card(old, new, outs):
    """The model card (README.md) is BEFORE's plus the `flexo serve` paragraph, nothing else; it leaves
    the byte comparison of every other file."""
    before = (old / "README.md").read_text().splitlines()
    after = (new / "README.md").read_text().splitlines()
    at = after.index("Or over HTTP (OpenAI-compatible completions; `exclude` and `attribution` per request, a playground at /):")
    assert after[at + 3] == "flexo serve --model <this folder>", after[at:at + SERVE_LINES]
    assert after[at - 1] == "" and after[:at - 1] + after[at + SERVE_LINES:] == before
    for who in ("old", "new"):
        outs[who].pop("README.md")


def _same_but_the_leak(old, new, outs):
    """The new opt-out of the tuned model: every file the same but the weights and flexo.json; the weights
    the same tensors, bytes for bytes, less what BEFORE leaked (router statistics and refits, named
    `<class>/…`, the withdrawn owner's included); flexo.json the same but the smaller size."""
    import json

    from flexo.weights import read_bytes, read_header

    differ = {f for f in outs["old"] if outs["old"][f] != outs["new"].get(f)}
    assert differ == {"model.safetensors", "flexo.json"} and outs["old"].keys() == outs["new"].keys(), differ
    before, after = read_header(old / "model.safetensors"), read_header(new / "model.safetensors")
    assert after.keys() < before.keys() and not any("/" in k for k in after)
    leaked = sorted(before.keys() - after.keys())
    assert all("/" in k for k in leaked) and any(k.startswith("beta/") for k in leaked), leaked[:5]
    assert all(bytes(read_bytes(before[k])) == bytes(read_bytes(after[k])) for k in after)
    a, b = json.loads((old / "flexo.json").read_text()), json.loads((new / "flexo.json").read_text())
    assert {k for k in a if a[k] != b.get(k)} == {"bytes"} and b["bytes"] < a["bytes"]
