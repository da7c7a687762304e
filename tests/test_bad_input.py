"""THE bad-input matrix: every kind of bad input a user or a broken copy can hand flexo, each run through
the real CLI (`flexo.cli.main` in-process; a few also as a real subprocess), each refused with exit code 2
and exactly one stderr line `flexo: error: …` that names the bad value, and no partial output: the
stage's output path is absent afterwards, or unchanged if it existed, and no temp folder is left behind.

A binary or non-UTF-8 file in an owner's folder is not an error: it is skipped and counted in the
curated manifest.

`test_write_matrix_doc` (last in this file) writes docs/bad_input_matrix.md from the messages observed
in this run: case | command | observed message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import (
    REPO, cli_env, copy_project, edit_manifest, edit_package, flexo_command, rehash, run_cli, write_checkpoint,
)
from flexo.fsutil import sha256_file
from flexo.layout import Layout

DOC = REPO / "docs" / "bad_input_matrix.md"


# ------------------------------------------------------------------------------------------ helpers
def snapshot(path: Path):
    """None if absent; a file's sha256; a folder's {relative path: sha256 or link target} (hidden files
    included; links are recorded, not followed)."""
    if path.is_symlink():
        return f"-> {os.readlink(path)}"
    if not path.exists():
        return None
    if path.is_file():
        return sha256_file(path)
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[p.relative_to(path).as_posix()] = f"-> {os.readlink(p)}"
            elif p.is_file():
                out[p.relative_to(path).as_posix()] = sha256_file(p)
    return dict(sorted(out.items()))


def leftovers(root: Path) -> list[str]:
    """Temp outputs of an interrupted write anywhere in the project (atomic_dir/atomic_path siblings)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".tmp-" in p.name or p.name.endswith(".partial"))


def write_params(layout: Layout, edit: Callable[[dict], None]) -> None:
    raw = yaml.safe_load(layout.params.read_text())
    edit(raw)
    layout.params.write_text(yaml.safe_dump(raw, sort_keys=False))


@dataclass
class Case:
    """What to break, which command to run, where its output goes, and a word the message must contain."""

    name: str
    what: str
    setup: Callable[[Layout, Path], list[str]]  # breaks the copy, returns argv after `--root ROOT`
    outs: Callable[[Layout, Path], list[Path]]
    words: str | Callable[[Layout, Path], str]
    tags: list[str] = field(default_factory=list)
    in_root: bool = False  # run with the project root as the working directory (relative paths)


CURATED_ALPHA = lambda L, t: [L.curated("alpha"), L.heldout("alpha")]  # noqa: E731
EXPERT_BETA = lambda L, t: [L.expert("beta"), L.checkpoints("expert-beta")]  # noqa: E731
MERGED = lambda L, t: [L.merged]  # noqa: E731
EXPERT_ALPHA = lambda L, t: [L.expert("alpha"), L.checkpoints("expert-alpha")]  # noqa: E731


def _params_case(name, what, edit, words):
    def setup(layout, tmp):
        write_params(layout, edit)
        return ["curate", "--owner", "alpha"]

    return Case(name, what, setup, CURATED_ALPHA, words)


def _set(section, key, value):
    def edit(raw):
        raw[section][key] = value

    return edit


def _owners(*names):
    def edit(raw):
        raw["owners"] = list(names)

    return edit


def _dp_case(dp: dict, **train_expert):
    """params.yaml with `train_expert.dp` (and other train_expert keys) set; runs train-expert for beta."""
    def setup(layout, tmp):
        def edit(raw):
            raw["train_expert"].update(train_expert)
            raw["train_expert"]["dp"] = dp

        write_params(layout, edit)
        return ["train-expert", "--owner", "beta"]

    return setup


def _init_from(pickle: bool):
    """params.yaml's model.init_from naming a tiny OLMo-2 checkpoint whose heads differ from model.num_heads
    (or the same folder holding a pickle instead of safetensors); runs the tokenizer stage."""
    def setup(layout, tmp):
        ckpt = write_checkpoint(tmp / "olmo2", "olmo2")
        if pickle:
            (ckpt / "model.safetensors").unlink()
            (ckpt / "pytorch_model.bin").write_bytes(b"not unpickled")
        write_params(layout, lambda raw: raw["model"].update(init_from=str(ckpt)))
        return ["tokenizer"]

    return setup


def _no_documents(layout, tmp):
    write_params(layout, _owners("alpha", "beta", "gamma"))
    layout.owner_inbox("gamma").mkdir(parents=True)
    (layout.owner_inbox("gamma") / "notes.md").write_text("not a .txt or .jsonl file\n")
    return ["curate", "--owner", "gamma"]


def _truncated(layout, tmp):
    path = layout.expert("alpha") / "expert.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return ["merge"]


def _random_bytes_package(layout, tmp):
    path = layout.expert("alpha") / "expert.safetensors"
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))
    rehash(layout.expert("alpha"))  # the hash matches: only the parser can tell
    return ["merge"]


def _random_bytes_public(layout, tmp):
    path = layout.public_model / "model.safetensors"
    path.write_bytes(random.Random(1).randbytes(path.stat().st_size))
    return ["train-expert", "--owner", "alpha"]


def _fingerprint(layout, tmp):
    edit_manifest(layout.expert("beta"), public_fingerprint="0" * 64)
    return ["merge"]


def _shapes(layout, tmp):
    edit_package(layout.expert("alpha"), lambda t: t.__setitem__("layers.0.router", torch.zeros(16)))
    return ["merge"]


def _manifest_shapes(layout, tmp):
    edit_manifest(layout.expert("alpha"), hidden_size=64)
    return ["merge"]


def _nan(layout, tmp):
    edit_package(layout.expert("alpha"), lambda t: t["layers.1.up_proj"].__setitem__((3, 4), float("nan")))
    return ["merge"]


def _inf(layout, tmp):
    edit_package(layout.expert("beta"), lambda t: t["layers.0.router"].__setitem__(5, float("inf")))
    return ["merge"]


def _expert_json_not_json(layout, tmp):
    (layout.expert("alpha") / "expert.json").write_text('{"owner": "alpha", ')
    return ["merge"]


def _flexo_json_not_json(layout, tmp):
    (layout.public_model / "flexo.json").write_bytes(b"\xff\xfe not json")
    return ["merge"]


def _flexo_json_not_json_train(layout, tmp):
    (layout.public_model / "flexo.json").write_text("fingerprint: abc")
    return ["train-expert", "--owner", "alpha"]


def _router_width(layout, tmp):
    save_file({"router_row": torch.ones(16), "embedder_mean": torch.ones(384)},
              str(layout.router_embedding("alpha")))
    return ["train-expert", "--owner", "alpha"]


def _opt_out_unknown(layout, tmp):
    from flexo.params import load_params
    from stages.merge import merge

    merge(load_params(layout.params), layout)
    return ["opt-out", "--model", str(layout.merged), "--exclude", "gamma", "--out", str(tmp / "no-gamma")]


CASES = [
    _params_case("params-unknown-key", "params.yaml with an unknown key",
                 _set("merge", "top_kk", 2), "merge.top_kk"),
    _params_case("params-wrong-type", "params.yaml with a wrong type",
                 _set("train_expert", "lr", "fast"), "train_expert.lr"),
    _params_case("params-out-of-range", "params.yaml with an out-of-range value",
                 _set("curate", "val_fraction", 0.7), "curate.val_fraction"),
    _params_case("params-duplicate-owner", "params.yaml lists an owner twice",
                 _owners("alpha", "beta", "alpha"), "'alpha'"),
    _params_case("params-owner-dotdot", "params.yaml owner named `../x`", _owners("alpha", "../x"), "'../x'"),
    _params_case("params-owner-space", "params.yaml owner named `A B`", _owners("alpha", "A B"), "'A B'"),
    Case("cli-owner-dotdot-curate", "`--owner ../x` on the command line (curate)",
         lambda L, t: ["curate", "--owner", "../x"], lambda L, t: [L.root / "data" / "x", L.root / "data" / "curated"],
         "'../x'"),
    Case("cli-owner-space-curate", "`--owner 'A B'` on the command line (curate)",
         lambda L, t: ["curate", "--owner", "A B"], lambda L, t: [L.root / "data" / "curated"], "'A B'"),
    Case("cli-owner-dotdot-train", "`--owner ../x` on the command line (train-expert)",
         lambda L, t: ["train-expert", "--owner", "../x"], lambda L, t: [L.root / "models"], "'../x'"),
    Case("cli-owner-space-embed", "`--owner 'A B'` on the command line (embed)",
         lambda L, t: ["embed", "--owner", "A B"], lambda L, t: [L.root / "models" / "router"], "'A B'"),
    Case("owner-without-documents", "an owner (not a FlexMix domain) whose folder holds no .txt/.jsonl",
         _no_documents, lambda L, t: [L.curated("gamma"), L.heldout("gamma")], "'gamma'"),
    Case("package-truncated", "a truncated `expert.safetensors`", _truncated, MERGED, "truncated"),
    Case("package-random-bytes", "`expert.safetensors` replaced by random bytes (hash updated to match)",
         _random_bytes_package, MERGED, "expert.safetensors"),
    Case("public-random-bytes", "the public `model.safetensors` replaced by random bytes (train-expert)",
         _random_bytes_public, EXPERT_ALPHA, "model.safetensors"),
    Case("package-fingerprint", "a package trained against another public model", _fingerprint, MERGED,
         "fingerprint"),
    Case("package-tensor-shape", "a package tensor of the wrong shape", _shapes, MERGED, "layers.0.router"),
    Case("package-manifest-shape", "a package whose expert.json shapes differ from the public model",
         _manifest_shapes, MERGED, "(2, 64, 64)"),
    Case("package-nan", "NaN in a package's weights", _nan, MERGED, "layers.1.up_proj"),
    Case("package-inf", "Inf in a package's weights", _inf, MERGED, "layers.0.router"),
    Case("expert-json-not-json", "`expert.json` that is not JSON", _expert_json_not_json, MERGED, "expert.json"),
    Case("flexo-json-not-json-merge", "the public model's `flexo.json` is not JSON (merge)",
         _flexo_json_not_json, MERGED, "flexo.json"),
    Case("flexo-json-not-json-train", "the public model's `flexo.json` is not JSON (train-expert)",
         _flexo_json_not_json_train, EXPERT_ALPHA, "flexo.json"),
    Case("merge-top-k-0", "`--top-k 0`", lambda L, t: ["merge", "--top-k", "0"], MERGED, "top-k 0"),
    Case("merge-exclude-unknown", "merge excluding an unknown owner", lambda L, t: ["merge", "--exclude", "gamma"],
         MERGED, "'gamma'"),
    Case("opt-out-exclude-unknown", "opt-out excluding an unknown owner", _opt_out_unknown,
         lambda L, t: [t / "no-gamma"], "'gamma'"),
    Case("router-embedding-width", "a router embedding of the wrong width (train-expert)", _router_width,
         EXPERT_ALPHA, "(16,)"),
    Case("audit-threshold", "audit-extraction `--threshold 1.5`",
         lambda L, t: ["audit-extraction", "--owner", "alpha", "--threshold", "1.5"],
         lambda L, t: [L.results], "1.5"),
]


# ------------------------------------------------------------------ never destroy: guarded outputs
def _merged_first(layout: Layout) -> None:
    from flexo.params import load_params
    from stages.merge import merge

    merge(load_params(layout.params), layout)


def _out_user_folder(layout, tmp):
    target = tmp / "my-folder"
    target.mkdir()
    (target / "notes.txt").write_text("a user's own file\n")
    return ["merge", "--out", str(target)]


def _out_user_file(layout, tmp):
    (tmp / "notes.txt").write_text("a user's own file\n")
    return ["merge", "--out", str(tmp / "notes.txt")]


def _opt_out_onto_package(layout, tmp):
    _merged_first(layout)
    return ["opt-out", "--model", str(layout.merged), "--exclude", "alpha", "--out", str(layout.expert("alpha"))]


def _opt_out_onto_input(layout, tmp):
    _merged_first(layout)
    return ["opt-out", "--model", str(layout.merged), "--exclude", "alpha", "--out", str(layout.merged)]


def _refused_merge_with_withdrawn_owner(layout, tmp):
    # dvc.lock says the last merge had alpha and beta; params.yaml now lists alpha only, and the merge is
    # refused (top-k 0): nothing of beta's may be gone afterwards.
    write_params(layout, _owners("alpha"))
    (layout.root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"merge": {
        "cmd": "flexo merge", "params": {"params.yaml": {"owners": ["alpha", "beta"]}}}}}))
    return ["merge", "--top-k", "0"]


# --------------------------------------------------------------------- never leak: bound identities
def _swap_owners(layout, tmp):
    edit_manifest(layout.expert("alpha"), owner="beta")
    edit_manifest(layout.expert("beta"), owner="alpha")
    return ["merge"]


def _manifest_edit(owner: str, edit: Callable[[dict], None] | None = None, raw: str | None = None):
    def setup(layout, tmp):
        path = layout.expert(owner) / "expert.json"
        if raw is not None:
            path.write_text(raw)
        else:
            meta = json.loads(path.read_text())
            edit(meta)
            path.write_text(json.dumps(meta))
        return ["merge"]
    return setup


def _symlinked_owner_folder(layout, tmp):
    inbox = layout.owner_inbox("alpha")
    shutil.rmtree(inbox)
    inbox.symlink_to(layout.owner_inbox("beta"), target_is_directory=True)
    return ["curate", "--owner", "alpha"]


# ------------------------------------------------------------------------- checked statistics
def _with_stats(edit: Callable[[dict], None]):
    def setup(layout, tmp):
        from flexo.params import load_params
        from stages.router_update import router_update

        params = load_params(layout.params)
        for owner in params.owners:
            router_update(owner, params, layout)
        _merged_first(layout)
        path = layout.router_update("alpha")
        stats = load_file(path)
        edit(stats)
        save_file(stats, str(path))
        return ["router-tune"]
    return setup


def _scale_means(stats):
    for k in [k for k in stats if k.endswith(".mean")]:
        stats[k] = stats[k] * 1e30


def _not_psd(stats):
    for k in [k for k in stats if k.endswith(".cov")]:
        stats[k] = -torch.eye(stats[k].shape[0])


def _nan_stats(stats):
    key = next(k for k in stats if k.endswith(".mean"))
    stats[key][0] = float("nan")


def _stats_of_another_public_model(layout, tmp):
    setup = _with_stats(lambda stats: None)
    argv = setup(layout, tmp)
    info_path = layout.router_update("alpha").with_suffix(".json")
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(dict(info, public_fingerprint="0" * 64)))
    return argv


def _router_update_with(**router_tune):
    def setup(layout, tmp):
        write_params(layout, lambda raw: raw["router_tune"].update(router_tune))
        return ["router-update", "--owner", "alpha"]
    return setup


def _opt_out_of_tuned_model(exclude: list[str]):
    def setup(layout, tmp):
        from flexo.params import load_params
        from stages.router_tune import router_tune
        from stages.router_update import router_update

        params = load_params(layout.params)
        _merged_first(layout)
        for owner in params.owners:
            router_update(owner, params, layout)
        router_tune(params, layout)
        return ["opt-out", "--model", str(layout.merged_rt), *[a for e in exclude for a in ("--exclude", e)],
                "--out", str(tmp / "opted")]
    return setup


def _scale_package(key_end: str):
    def setup(layout, tmp):
        edit_package(layout.expert("alpha"), lambda t: [t.__setitem__(k, t[k] * 1e30) for k in list(t) if k.endswith(key_end)])
        return ["merge"]
    return setup


# --------------------------------------------------------------------------- one line, not a traceback
def _params_bytes(data: bytes, command: list[str]):
    def setup(layout, tmp):
        layout.params.write_bytes(data)
        return command
    return setup


def _malformed_lock(layout, tmp):
    (layout.root / "dvc.lock").write_text("schema: '2.0'\nstages: [unclosed\n")
    return ["merge"]


def _attribute_folder(layout, tmp):
    _merged_first(layout)
    return ["attribute", "--model", str(layout.merged), "--file", str(tmp)]


PROTECTED = "belongs to the project"
CASES += [
    Case("merge-out-data", "`flexo merge --out data` (every owner's data)",
         lambda L, t: ["merge", "--out", str(L.root / "data")], lambda L, t: [L.root / "data"], PROTECTED),
    Case("merge-out-public-model", "`flexo merge --out models/public` (its own input)",
         lambda L, t: ["merge", "--out", str(L.public_model)], lambda L, t: [L.public_model], "input"),
    Case("merge-out-dot", "`flexo merge --out .` in the project root",
         lambda L, t: ["merge", "--out", "."], lambda L, t: [L.root / "data", L.root / "models"],
         "refusing to write the merged model to .:", in_root=True),
    Case("merge-out-user-folder", "`--out` onto a folder holding a user's own file",
         _out_user_folder, lambda L, t: [t / "my-folder"], "not an earlier merged model"),
    Case("merge-out-user-file", "`--out` onto a user's file", _out_user_file, lambda L, t: [t / "notes.txt"],
         "it is a file"),
    Case("opt-out-out-package", "`flexo opt-out … --out models/experts/alpha` (an owner's package)",
         _opt_out_onto_package, lambda L, t: [L.expert("alpha")], PROTECTED),
    Case("opt-out-out-input", "`flexo opt-out --model models/merged … --out models/merged` (its own input)",
         _opt_out_onto_input, MERGED, "input"),
    Case("merge-refused-deletes-nothing", "a merge refused (top-k 0) after an owner was withdrawn from params.yaml",
         _refused_merge_with_withdrawn_owner, lambda L, t: [L.expert("beta"), L.curated("beta"), L.heldout("beta")],
         "top-k 0"),
    Case("package-owners-swapped", "two packages' `owner` fields swapped", _swap_owners, MERGED,
         "lies in a folder named 'alpha'"),
    Case("package-owner-newline", "a package whose owner is `\"alpha\\n\"`",
         _manifest_edit("alpha", lambda m: m.__setitem__("owner", "alpha\n")), MERGED, "not allowed"),
    _params_case("params-owner-newline", "params.yaml `owners: [alpha, \"alpha\\n\"]`",
                 _owners("alpha", "alpha\n"), "not allowed"),
    _params_case("params-owner-too-long", "a 300-character owner name in params.yaml",
                 _owners("alpha", "a" * 300), "300 characters"),
    Case("cli-owner-too-long", "`--owner` with 300 characters (curate)",
         lambda L, t: ["curate", "--owner", "b" * 300], lambda L, t: [L.root / "data"], "300 characters"),
    Case("owner-folder-symlink", "`data/owners/alpha` is a symbolic link to beta's folder",
         _symlinked_owner_folder, CURATED_ALPHA, "symbolic link"),
    Case("stats-mean-1e30", "router statistics with every mean scaled by 1e30 (router-tune)",
         _with_stats(_scale_means), lambda L, t: [L.merged_rt], "mean norm"),
    Case("stats-cov-not-psd", "router statistics whose covariance is not positive semi-definite",
         _with_stats(_not_psd), lambda L, t: [L.merged_rt], "negative eigenvalue"),
    Case("stats-nan", "router statistics with a NaN in a mean (router-tune)",
         _with_stats(_nan_stats), lambda L, t: [L.merged_rt], "NaN"),
    Case("stats-other-public", "router statistics made against another public model (router-tune)",
         _stats_of_another_public_model, lambda L, t: [L.merged_rt], "another public"),
    Case("stats-too-little-text", "router statistics from 2 documents (`router_tune.stats_documents: 2`)",
         _router_update_with(stats_documents=2), lambda L, t: [L.router_update("alpha")], "stats_documents"),
    Case("stats-epsilon-unmeetable", "a DP budget the accountant cannot meet (`router_tune.dp_epsilon: 1e-9`)",
         _router_update_with(dp_epsilon=1e-9), lambda L, t: [L.router_update("alpha")], "cannot be met"),
    Case("stats-delta-too-big", "a DP δ not below 1/documents (`router_tune.dp_epsilon: 1`, `dp_delta: 0.5`)",
         _router_update_with(dp_epsilon=1.0, dp_delta=0.5), lambda L, t: [L.router_update("alpha")], "dp_delta"),
    Case("opt-out-rt-unknown", "opt-out of the router-tuned default model excluding an unknown owner",
         _opt_out_of_tuned_model(["gamma"]), lambda L, t: [t / "opted"], "gamma"),
    Case("opt-out-rt-everyone", "opt-out of the router-tuned default model excluding every owner",
         _opt_out_of_tuned_model(["alpha", "beta"]), lambda L, t: [t / "opted"], "every owner"),
    Case("package-router-1e30", "a package's router rows scaled by 1e30 (hash updated to match)",
         _scale_package(".router"), MERGED, "router row"),
    Case("package-ffn-1e30", "a package's FFN weights scaled by 1e30 (hash updated to match)",
         _scale_package("_proj"), MERGED, "RMS"),
    Case("expert-json-null", "`expert.json` that is `null`", _manifest_edit("alpha", raw="null"), MERGED, "NoneType"),
    Case("expert-json-string", "`expert.json` that is a string", _manifest_edit("alpha", raw='"alpha"'), MERGED,
         "not a JSON object"),
    Case("expert-json-hash-number", "`expert.json` with a number where the tensors' sha256 belongs",
         _manifest_edit("alpha", lambda m: m.__setitem__("tensors_sha256", 12345)), MERGED, "tensors_sha256"),
    Case("params-latin1", "params.yaml with a Latin-1 byte",
         _params_bytes(b"# caf\xe9\nowners: [alpha, beta]\n", ["curate", "--owner", "alpha"]), CURATED_ALPHA,
         "not UTF-8"),
    Case("params-nested", "params.yaml with 5,000 nested brackets",
         _params_bytes(b"owners: " + b"[" * 5000 + b"]" * 5000 + b"\n", ["curate", "--owner", "alpha"]),
         CURATED_ALPHA, "nested too deeply"),
    _params_case("params-epochs-inf", "params.yaml `epochs: .inf`", _set("train_expert", "epochs", float("inf")),
                 "finite"),
    Case("dvc-lock-malformed", "a `dvc.lock` that is not valid YAML (merge)", _malformed_lock, MERGED, "dvc.lock"),
    Case("attribute-file-is-folder", "`flexo attribute --file` naming a folder", _attribute_folder,
         lambda L, t: [L.results], "is a folder"),
]


# ------------------------------------------------------- found by a probing run as a hostile user would
def _out_earlier_merge_with_user_file(layout, tmp):
    from flexo.params import load_params
    from stages.merge import merge

    target = tmp / "mymodel"
    merge(load_params(layout.params), layout, out=target)
    (target / "notes.txt").write_text("a user's own notes\n")
    return ["merge", "--out", str(target)]


def _curated_folder_link(layout, tmp):
    shutil.rmtree(layout.curated("alpha"))
    layout.curated("alpha").symlink_to("beta", target_is_directory=True)
    return ["train-expert", "--owner", "alpha"]


def _curated_file_link(layout, tmp):
    split = layout.split_file("alpha", "train")
    split.unlink()
    split.symlink_to(Path("..", "beta", "train.jsonl"))
    return ["embed", "--owner", "alpha"]


def _json_edit(path_of: Callable[[Layout], Path], edit: Callable[[dict], None], argv: Callable[[Layout, Path], list[str]],
               merged_first: bool = False):
    def setup(layout, tmp):
        if merged_first:
            _merged_first(layout)
        path = path_of(layout)
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
        return argv(layout, tmp)
    return setup


def _write_text(path_of: Callable[[Layout], Path], text: str, argv: list[str]):
    def setup(layout, tmp):
        path_of(layout).write_text(text)
        return argv
    return setup


OPT_OUT_ALPHA = lambda L, t: ["opt-out", "--model", str(L.merged), "--exclude", "alpha", "--out", str(t / "no-alpha")]  # noqa: E731
CASES += [
    Case("merge-out-earlier-merge-with-user-file", "`--out` onto an earlier merged model that also holds a user's file",
         _out_earlier_merge_with_user_file, lambda L, t: [t / "mymodel"], "holds notes.txt"),
    Case("curated-folder-link", "`data/curated/alpha` is a link to beta's curated folder (train-expert)",
         _curated_folder_link, EXPERT_ALPHA, "symbolic link"),
    Case("curated-split-link", "alpha's train split is a link to beta's (embed)", _curated_file_link,
         lambda L, t: [L.router_embedding("alpha")], "sha256"),
    Case("curated-manifest-empty", "alpha's curated manifest.json is `{}` (train-expert)",
         _write_text(lambda L: L.curated("alpha") / "manifest.json", "{}", ["train-expert", "--owner", "alpha"]),
         EXPERT_ALPHA, "belongs to None"),
    Case("flexo-json-experts-int", "a merged model's flexo.json with `experts: 5` (opt-out)",
         _json_edit(lambda L: L.merged / "flexo.json", lambda d: d.__setitem__("experts", 5), OPT_OUT_ALPHA, True),
         lambda L, t: [t / "no-alpha"], "experts must be a JSON list"),
    Case("flexo-json-packages-list", "a merged model's flexo.json with `packages: [1]` (opt-out)",
         _json_edit(lambda L: L.merged / "flexo.json", lambda d: d.__setitem__("packages", [1]), OPT_OUT_ALPHA, True),
         lambda L, t: [t / "no-alpha"], "packages must be a JSON dict"),
    Case("config-json-wrong-type", "a merged model's config.json with `num_hidden_layers: \"two\"` (attribute)",
         _json_edit(lambda L: L.merged / "config.json", lambda d: d.__setitem__("num_hidden_layers", "two"),
                    lambda L, t: ["attribute", "--model", str(L.merged), "--text", "Hello there."], True),
         lambda L, t: [L.results], "config.json is not a valid model config"),
    Case("config-json-not-json", "a merged model's config.json that is not JSON (opt-out)",
         lambda L, t: (_merged_first(L), (L.merged / "config.json").write_text("{"), OPT_OUT_ALPHA(L, t))[-1],
         lambda L, t: [t / "no-alpha"], "config.json is not valid JSON"),
    Case("tokenizer-json-not-json", "models/tokenizer/tokenizer.json that is not JSON (curate counts tokens with it)",
         _write_text(lambda L: L.tokenizer / "tokenizer.json", "{", ["curate", "--owner", "alpha"]), CURATED_ALPHA,
         "tokenizer"),
    Case("audit-seed-huge", "audit-extraction `--seed 100000000000000000000`",
         lambda L, t: ["audit-extraction", "--owner", "alpha", "--seed", "100000000000000000000"],
         lambda L, t: [L.results], "--seed"),
    Case("audit-temperature-tiny", "audit-extraction `--temperature 1e-40`",
         lambda L, t: ["audit-extraction", "--owner", "alpha", "--temperature", "1e-40"],
         lambda L, t: [L.results], "--temperature"),
    Case("evaluate-limit-huge", "evaluate `--limit 100000000000000000000`",
         lambda L, t: ["evaluate", "--model", str(L.public_model), "--limit", "100000000000000000000"],
         lambda L, t: [L.results], "--limit"),
    _params_case("params-seed-huge", "params.yaml `embed.seed: 100000000000000000000`",
                 _set("embed", "seed", 10**20), "embed.seed"),
    Case("attribute-file-device", "`flexo attribute --file /dev/zero`",
         lambda L, t: (_merged_first(L), ["attribute", "--model", str(L.merged), "--file", "/dev/zero"])[-1],
         lambda L, t: [L.results], "not a regular file"),
    Case("dp-delta-too-big", "DP training with δ not below 1/documents (`train_expert.dp: {epsilon: 8, delta: 0.5}`)",
         _dp_case({"epsilon": 8, "delta": 0.5}), EXPERT_BETA, "is not below 1/"),
    Case("dp-epsilon-unreachable", "a DP ε the accountant cannot reach (`train_expert.dp.epsilon: 1e-4`)",
         _dp_case({"epsilon": 1e-4, "delta": 1e-3}), EXPERT_BETA, "cannot be reached"),
    Case("dp-deepspeed", "DP training with `train_expert.backend: deepspeed`",
         _dp_case({"epsilon": 8, "delta": 1e-3}, backend="deepspeed"), EXPERT_BETA, "DeepSpeed backend"),
    Case("dp-owner-unknown", "`train_expert.dp.owners: [gamma]`, not an owner",
         _dp_case({"epsilon": 8, "owners": ["gamma"]}), EXPERT_BETA, "not in owners"),
    Case("init-from-shape", "`model.init_from` names an OLMo-2 checkpoint whose heads differ from `model.num_heads`",
         _init_from(pickle=False), lambda L, t: [L.tokenizer], "set model.num_heads: 4"),
    Case("init-from-pickle", "`model.init_from` names a folder with `pytorch_model.bin` and no safetensors",
         _init_from(pickle=True), lambda L, t: [L.tokenizer], "pickle checkpoints"),
    Case("plan-does-not-fit", "`flexo plan` for GPUs of 0.0001 GB",
         lambda L, t: ["plan", "--gpu-mem", "0.0001"], lambda L, t: [L.results], "does not fit"),
    Case("serve-no-model", "`flexo serve --model` naming a folder that does not exist",
         lambda L, t: ["serve", "--model", str(t / "nowhere"), "--port", "0"], lambda L, t: [L.results],
         "not a model folder"),
    Case("serve-engine-vllm", "`flexo serve --engine vllm` without vLLM or a GPU",
         lambda L, t: (_merged_first(L), ["serve", "--model", str(L.merged), "--engine", "vllm", "--port", "0"])[-1],
         lambda L, t: [L.results], "--engine vllm cannot run here"),
    Case("benchmark-unknown-task", "`flexo benchmark --tasks flexo_arc_easy,arc_esay` (a typo)",
         lambda L, t: (_merged_first(L), ["benchmark", "--tasks", "flexo_arc_easy,arc_esay"])[-1],
         lambda L, t: [L.results, L.root / "data" / "benchmarks"], "unknown task 'arc_esay'"),
    Case("benchmark-limit-0", "`flexo benchmark --limit 0`", lambda L, t: (_merged_first(L), ["benchmark", "--limit", "0"])[-1],
         lambda L, t: [L.results, L.root / "data" / "benchmarks"], "--limit must be a positive number"),
    Case("benchmark-not-flexolmo", "`flexo benchmark --model` naming a dense GPT-2 folder, not FlexOlmo",
         lambda L, t: (t.joinpath("gpt2").mkdir(), t.joinpath("gpt2", "config.json").write_text(
             '{"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}'), ["benchmark", "--model", str(t / "gpt2")])[-1],
         lambda L, t: [L.results, L.root / "data" / "benchmarks"], "not flex_olmo"),
    _params_case("params-benchmark-limit-0", "params.yaml `benchmark.limit: 0`", _set("benchmark", "limit", 0),
                 "benchmark.limit must be >= 1"),
]
SUBPROCESS = ["params-unknown-key", "package-truncated", "router-embedding-width", "opt-out-exclude-unknown",
              "merge-out-data", "config-json-wrong-type"]
OBSERVED: dict[str, dict] = {}


def display(argv: list[str], layout: Layout, tmp: Path) -> str:
    shown = [a if len(a) <= 60 else f"{a[:12]}…({len(a)} characters)" for a in argv]
    text = " ".join(f"'{a}'" if " " in a else a for a in shown)
    return "flexo " + text.replace(str(layout.root) + "/", "").replace(str(tmp), "TMP")


def scrub(message: str, layout: Layout, tmp: Path) -> str:
    """Paths relative to the project, and hash prefixes (which vary with float rounding) as `{hash}`, so the
    generated note only changes when a message does."""
    message = message.replace(str(layout.root) + "/", "").replace(str(layout.root), ".").replace(str(tmp), "TMP")
    return re.sub(r"\b[0-9a-f]{12}…", "{hash}…", message)


def prepare(case: Case, tiny: Layout, tmp: Path) -> tuple[Layout, list[str], list[Path], str, dict]:
    """A copy of the tiny project, broken by the case; the paths to compare before and after: the case's
    outputs, plus the project's data, models and dvc.lock (a refusal changes nothing anywhere)."""
    layout = copy_project(tiny, tmp / "project").layout
    root = layout.root
    argv = case.setup(layout, tmp)
    outs = list(dict.fromkeys([*case.outs(layout, tmp), root / "data", root / "models", root / "dvc.lock"]))
    words = case.words(layout, tmp) if callable(case.words) else case.words
    return layout, argv, outs, words, {p: snapshot(p) for p in outs}


def check_refusal(case: Case, rc: int, err: str, layout: Layout, outs: list[Path], words: str, before: dict,
                  tmp: Path) -> None:
    lines = err.splitlines()
    assert rc == 2, f"{case.name}: exit {rc}\n{err}"
    assert len(lines) == 1 and err.endswith("\n"), f"{case.name}: stderr is not one line:\n{err}"
    assert lines[0].startswith("flexo: error: ") and "Traceback" not in err, err
    assert words in lines[0], f"{case.name}: {words!r} not in {lines[0]!r}"
    for p in outs:
        assert snapshot(p) == before[p], f"{case.name}: {p} changed"
    assert not leftovers(layout.root), leftovers(layout.root)
    assert not [p for p in tmp.iterdir() if ".tmp-" in p.name]


def run_case(case: Case, tiny: Layout, tmp: Path) -> dict:
    layout, argv, outs, words, before = prepare(case, tiny, tmp)
    with contextlib.chdir(layout.root) if case.in_root else contextlib.nullcontext():
        rc, _, err = run_cli(["--root", str(layout.root), *argv])
    check_refusal(case, rc, err, layout, outs, words, before, tmp)
    OBSERVED[case.name] = {"what": case.what, "command": display(argv, layout, tmp),
                           "message": scrub(err.strip(), layout, tmp)}
    return OBSERVED[case.name]


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_partial_output(case, tiny_project, tmp_path):
    run_case(case, tiny_project, tmp_path)


@pytest.mark.parametrize("name", SUBPROCESS)
def test_bad_input_in_a_real_process(name, tiny_project, tmp_path):
    """The same refusals from a real `flexo` process: no log line, warning or progress bar around the one
    error line either."""
    case = next(c for c in CASES if c.name == name)
    layout, argv, outs, words, before = prepare(case, tiny_project, tmp_path)
    r = subprocess.run([*flexo_command(), "--root", str(layout.root), *argv],
                       capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=300)
    check_refusal(case, r.returncode, r.stderr, layout, outs, words, before, tmp_path)
    assert r.stdout == ""


def test_python_dash_m_knows_the_registered_subcommands(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flexo.cli", "merge", "--help"], capture_output=True, text=True,
                       cwd=REPO, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr


def _curate_alpha_again(layout: Layout, caplog) -> tuple[dict, dict, dict]:
    """Rerun `flexo curate --owner alpha` on a copy whose inbox a test changed (curate's warnings captured):
    the manifest's inbox report, and alpha's splits before and after."""
    splits = lambda: {s: layout.split_file("alpha", s).read_bytes() for s in ("train", "val", "test")}  # noqa: E731
    before = splits()
    with caplog.at_level(logging.WARNING, logger="stages.curate"):
        rc, _, err = run_cli(["--root", str(layout.root), "curate", "--owner", "alpha"])
    assert rc == 0, err
    assert "flexo: error" not in err and "Traceback" not in err
    return json.loads((layout.curated("alpha") / "manifest.json").read_text())["inbox"], before, splits()


def test_binary_and_non_utf8_files_are_skipped_and_counted(tiny_project, tmp_path, caplog):
    layout = copy_project(tiny_project, tmp_path / "project").layout
    inbox = layout.owner_inbox("alpha")
    (inbox / "blob.txt").write_bytes(b"\x00\x01\x02binary\xff" * 64)
    (inbox / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 40)
    with open(os.fsencode(inbox) + b"/caf\xe9.txt", "wb") as f:  # a file name that is not UTF-8
        f.write(b"Some text that would be fine if its name were UTF-8.\n" * 10)
    inbox_report, before, after = _curate_alpha_again(layout, caplog)
    assert inbox_report["skipped_files"] == 3
    assert inbox_report["skipped"] == ["blob.txt", "caf\ufffd.txt", "latin1.txt"]
    assert inbox_report["files"] == len(list(inbox.glob("*.txt"))) - 1  # the badly named one is not read
    # the skipped files add nothing: the splits are the ones curated without them
    assert after == before
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 3
    OBSERVED["inbox-binary-non-utf8"] = {
        "what": "a binary `.txt` file, a non-UTF-8 (Latin-1) one and one whose name is not UTF-8 in the owner's "
                "folder (not an error)",
        "command": "flexo curate --owner alpha",
        "message": "exit 0; manifest `inbox.skipped_files: 3`, `skipped: [blob.txt, caf\ufffd.txt, latin1.txt]`; "
                   "log warnings: "
                   + " / ".join(scrub(w, layout, tmp_path) for w in warnings),
    }


def test_symlinks_in_an_owner_folder_are_skipped_and_counted(tiny_project, tmp_path, caplog):
    """A link to another owner's curated split, one to a system file and a linked sub-folder: none is read."""
    layout = copy_project(tiny_project, tmp_path / "project").layout
    inbox = layout.owner_inbox("alpha")
    (inbox / "leak.jsonl").symlink_to(Path("..", "..", "curated", "beta", "train.jsonl"))
    (inbox / "passwd.txt").symlink_to("/etc/passwd")
    (inbox / "more").symlink_to(layout.owner_inbox("beta"), target_is_directory=True)
    os.link(layout.split_file("beta", "test"), inbox / "held.jsonl")  # a hard link to beta's held-out split
    report, before, after = _curate_alpha_again(layout, caplog)
    assert report["skipped_links"] == 4
    assert sorted(report["skipped"]) == ["held.jsonl", "leak.jsonl", "more", "passwd.txt"]
    # nothing of beta's (or of /etc) reached alpha's splits: they are byte for byte the ones without the links
    assert after == before
    beta_texts = {json.loads(line)["text"] for line in layout.split_file("beta", "train").read_text().splitlines()}
    assert not beta_texts & {json.loads(line)["text"] for line in layout.split_file("alpha", "train").read_text().splitlines()}
    warnings = [r.getMessage() for r in caplog.records if " link" in r.getMessage()]
    assert len(warnings) == 4
    OBSERVED["inbox-symlinks"] = {
        "what": "symbolic links in the owner's folder (to another owner's curated split, to /etc/passwd, to a "
                "folder) and a hard link to another owner's held-out split (not an error)",
        "command": "flexo curate --owner alpha",
        "message": "exit 0; manifest `inbox.skipped_links: 4`; log warnings: "
                   + " / ".join(scrub(w, layout, tmp_path) for w in warnings[:2]) + " (and 2 more)",
    }


def test_no_space_left_is_one_line_and_leaves_nothing(tiny_project, tmp_path):
    """A real process whose file-size limit (RLIMIT_FSIZE) is below the merged model's size: the write fails
    with EFBIG as on a full disk; one line, exit 2, no merged folder, no temp folder."""
    import resource

    layout, argv, outs, words, before = prepare(Case("no-space", "", lambda L, t: ["merge"], MERGED, ""),
                                                tiny_project, tmp_path)
    limit = 256 * 1024  # bytes: the tiny merged model's shard is larger

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([*flexo_command(), "--root", str(layout.root), *argv], capture_output=True, text=True,
                       cwd=REPO, env=cli_env(), timeout=300, preexec_fn=small_files)
    case = Case("merge-no-space", "no space left on the output disk (a real process under a file-size limit)",
                lambda L, t: argv, MERGED, "no space left")
    check_refusal(case, r.returncode, r.stderr, layout, outs, "no space left", before, tmp_path)
    OBSERVED[case.name] = {"what": case.what, "command": "flexo merge", "message": scrub(r.stderr.strip(), layout, tmp_path)}


def test_serving_an_empty_prompt_is_one_line(merged):
    from flexo.errors import FlexoError
    from flexo.serving import FlexoServer

    server = FlexoServer(merged)
    with pytest.raises(FlexoError) as e:
        server.respond("")
    assert "empty prompt" in str(e.value) and "\n" not in str(e.value)
    OBSERVED["server-empty-prompt"] = {"what": "an empty prompt to the Python server", "command":
                                       "FlexoServer(models/merged).respond('')", "message": f"FlexoError: {e.value}"}


EXTRA = ["inbox-binary-non-utf8", "inbox-symlinks", "merge-no-space", "server-empty-prompt"]


def render_matrix(observed: dict[str, dict]) -> str:
    lines = [
        "# Bad-input matrix",
        "",
        "Generated by `tests/test_bad_input.py` (`test_write_matrix_doc`) from the messages observed in the run;",
        "do not edit by hand. Every case runs the real CLI on a copy of the tiny test project. Each refusal",
        "exits with status 2, prints exactly the one line quoted here on stderr and leaves the stage's output",
        "absent or unchanged (no temp folder either). Paths are relative to the project root, `TMP` is the",
        "test's temp folder and `{hash}` stands for a 12-hex-digit hash prefix.",
        "",
        "| case | what is wrong | command | observed message |",
        "|---|---|---|---|",
    ]
    order = [c.name for c in CASES] + EXTRA
    for name in order:
        o = observed[name]
        cell = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines.append(f"| {name} | {cell(o['what'])} | `{cell(o['command'])}` | {cell(o['message'])} |")
    return "\n".join(lines) + "\n"


def test_write_matrix_doc(tiny_project, merged, tmp_path_factory, caplog):
    """docs/bad_input_matrix.md from this run's observations (cases not run in this session are run here)."""
    for case in CASES:
        if case.name not in OBSERVED:
            run_case(case, tiny_project, tmp_path_factory.mktemp(case.name))
    if "inbox-binary-non-utf8" not in OBSERVED:
        test_binary_and_non_utf8_files_are_skipped_and_counted(tiny_project, tmp_path_factory.mktemp("inbox"), caplog)
    if "inbox-symlinks" not in OBSERVED:
        test_symlinks_in_an_owner_folder_are_skipped_and_counted(tiny_project, tmp_path_factory.mktemp("links"), caplog)
    if "merge-no-space" not in OBSERVED:
        test_no_space_left_is_one_line_and_leaves_nothing(tiny_project, tmp_path_factory.mktemp("nospace"))
    if "server-empty-prompt" not in OBSERVED:
        test_serving_an_empty_prompt_is_one_line(merged)
    text = render_matrix(OBSERVED)
    DOC.parent.mkdir(exist_ok=True)
    if not DOC.is_file() or DOC.read_text() != text:
        DOC.write_text(text)
    assert all(o["message"].startswith("flexo: error: ") for n, o in OBSERVED.items() if n in {c.name for c in CASES})
