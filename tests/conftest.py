"""Shared fixtures: a tiny flexo project (2 owners, a 2-layer width-32 model) built once per session
through the real stage functions, so later-stage tests start from real artifacts in seconds."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu", "TRANSFORMERS_VERBOSITY": "error",
               "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

TINY_PARAMS = """
owners: [alpha, beta]
curate: {public_train_chars: 120000, owner_train_chars: 60000, max_eval_chars: 8000, min_doc_chars: 100,
         chunk_chars: 1500, val_fraction: 0.1, test_fraction: 0.1}
tokenizer: {vocab_size: 512}
model: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_seq_len: 64}
train_public: {max_steps: 30, batch_size: 8, lr: 5.0e-3, warmup_steps: 3, checkpoint_every: 10, eval_every: 10}
embed: {documents: 16, batch_size: 16}
train_expert: {max_steps: 12, batch_size: 8, lr: 1.0e-2, warmup_steps: 2, checkpoint_every: 4, eval_every: 4,
               router_steps: 60}
merge: {top_k: 2}
router_tune: {steps: 4, batch_size: 4, proxy_documents: 8, fit_samples: 400, fit_steps: 60}
evaluate: {batch_size: 4, max_length: 64, limit: 6}
benchmark: {limit: 1, max_gen_toks: 4, max_length: 256, batch_size: 4, tasks: [flexo_arc_easy, flexo_gsm8k]}
audit: {documents: 8}
"""


def stdlib_files(package: str, limit: int) -> list[Path]:
    root = Path(sysconfig.get_path("stdlib")) / package
    return sorted(p for p in root.rglob("*.py") if "test" not in p.parts)[:limit]


def prose_documents() -> list[str]:
    """Real English prose that ships with every CPython: the pydoc topic help texts."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def arithmetic_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(12):
            a, b = rng.randint(2, 999), rng.randint(2, 999)
            op = rng.choice(["+", "-", "*"])
            lines.append(f"Calculate {a} {op} {b}. Answer: {eval(f'{a}{op}{b}')}")
        docs.append("\n".join(lines))
    return docs


REPO = Path(__file__).resolve().parents[1]


def download_cache() -> Path:
    """The session-wide download cache the tests share and keep between runs: $FLEXO_TEST_CACHE, else
    <repo>/.cache/test-downloads."""
    return Path(os.environ.get("FLEXO_TEST_CACHE", REPO / ".cache" / "test-downloads"))


# Every project a test makes downloads into that one cache (the benchmark stage's 85 MB wheel, once).
os.environ.setdefault("FLEXO_DOWNLOADS", str(download_cache()))


def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    from flexo.fsutil import sha256_file

    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def all_tensors(folder: Path) -> dict:
    """Every tensor of a model folder (all safetensors shards), by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def make_tiny_project(root: Path) -> Path:
    """params.yaml + owner inboxes: alpha = stdlib `email` code, beta = arithmetic drills."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(TINY_PARAMS)
    alpha = root / "data" / "owners" / "alpha"
    alpha.mkdir(parents=True)
    for p in stdlib_files("email", 40) + stdlib_files("xml", 30):
        name = "_".join(p.relative_to(sysconfig.get_path("stdlib")).with_suffix("").parts)
        (alpha / f"{name}.txt").write_text(p.read_text(encoding="utf-8"))
    beta = root / "data" / "owners" / "beta"
    beta.mkdir(parents=True)
    with open(beta / "drills.jsonl", "w") as f:
        for doc in arithmetic_documents(160):
            f.write(json.dumps({"text": doc}) + "\n")
    return root


def public_documents():
    from stages.curate import Doc

    docs = [Doc(t, "pydoc-topics", f"topic{i}") for i, t in enumerate(prose_documents())]
    docs += [Doc(p.read_text(encoding="utf-8"), "stdlib-json-collections", p.name)
             for p in stdlib_files("json", 10) + stdlib_files("collections", 10)]
    return docs


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A tiny project with every stage up to the trained experts done (≈30 s on 2 cores)."""
    from flexo.layout import Layout
    from flexo.params import load_params
    from stages.curate import curate
    from stages.embed import embed
    from stages.tokenizer import train_tokenizer
    from stages.train_expert import train_expert
    from stages.train_public import train_public

    root = make_tiny_project(tmp_path_factory.mktemp("tiny"))
    layout = Layout.at(root)
    params = load_params(layout.params)
    curate("public", params, layout, documents=public_documents())
    train_tokenizer(params, layout)
    for owner in params.owners:
        curate(owner, params, layout)
    for name in ["public", *params.owners]:
        embed(name, params, layout)
    train_public(params, layout)
    for owner in params.owners:
        train_expert(owner, params, layout)
    return layout


@pytest.fixture(scope="module")
def ctx(tiny_project):
    """(params, layout) of the tiny project."""
    from flexo.params import load_params

    return load_params(tiny_project.params), tiny_project


@pytest.fixture(scope="module")
def merged(ctx, tmp_path_factory) -> Path:
    """The tiny project's public model and both experts merged (top-2), one copy per test module."""
    from stages.merge import merge

    params, layout = ctx
    out = tmp_path_factory.mktemp("merged") / "merged"
    merge(params, layout, out=out)
    return out


# --------------------------------------------------------------------------------- copies of the project
def copy_project(tiny, dst: Path, *, merged: bool = False, ignore: Callable | None = None):
    """A copy of the tiny project at `dst` (links copied as links), opened as a `flexo.project.Project`;
    `merged=True` also merges it (models/merged), as most later-stage tests need. `ignore` is
    shutil.copytree's."""
    from flexo.project import Project

    shutil.copytree(tiny.root, dst, symlinks=True, ignore=ignore)
    project = Project.open(dst)
    if merged:
        from stages.merge import merge

        merge(project.params, project.layout)
    return project


@pytest.fixture(scope="session")
def evaluated(tiny_project, tmp_path_factory):
    """A copy of the tiny project, merged, scored by each owner (score@owner) and evaluated by the stage
    (baselines on, 2 documents per domain)."""
    from stages.evaluate import evaluate
    from stages.score import score

    project = copy_project(tiny_project, tmp_path_factory.mktemp("evalproj") / "p", merged=True)
    layout, params, root = project.layout, project.params, project.root
    before = sorted(p.relative_to(root) for p in (root / "models").rglob("*"))
    for owner in params.owners:
        score(owner, params, layout, limit=2)
    metrics = evaluate(params, layout, limit=2)
    return layout, params, metrics, before


@pytest.fixture
def project_copy(tiny_project, tmp_path):
    """A fresh copy of the tiny project for one test to change (a `Project`: .layout, .params)."""
    return copy_project(tiny_project, tmp_path / "project")


# ------------------------------------------------------------------------------------- expert packages
def package_copy(layout, owner: str, dst: Path) -> Path:
    """A copy of `owner`'s expert package alone (no model folder, no loss log) at `dst`."""
    shutil.copytree(layout.expert(owner), dst, ignore=shutil.ignore_patterns("model", "loss.csv"))
    return dst


def edit_manifest(pkg: Path, **changes) -> dict:
    """Set `changes` in a package's expert.json; returns the manifest as written."""
    meta = json.loads((pkg / "expert.json").read_text())
    meta.update(changes)
    (pkg / "expert.json").write_text(json.dumps(meta))
    return meta


def rehash(pkg: Path) -> None:
    """Make expert.json's tensors_sha256 match the (edited) tensors, as a re-export would."""
    from flexo.fsutil import sha256_file

    edit_manifest(pkg, tensors_sha256=sha256_file(pkg / "expert.safetensors"))


def edit_package(pkg: Path, edit: Callable[[dict], None]) -> None:
    """Load a package's tensors, `edit` them in place, save them and rehash the manifest."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(pkg / "expert.safetensors")
    edit(tensors)
    save_file(tensors, str(pkg / "expert.safetensors"))
    rehash(pkg)


# ---------------------------------------------------------------------------------------- the command line
class CliRun(NamedTuple):
    rc: int
    out: str
    err: str


def run_cli(argv: list[str]) -> CliRun:
    """`flexo ARGV` in-process (`flexo.cli.main`, every stage's subcommand registered): exit code, stdout
    and stderr."""
    from flexo import cli

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main(argv)
    return CliRun(rc, out.getvalue(), err.getvalue())


def flexo_command() -> list[str]:
    """The installed `flexo` console script (what users, DVC and the flows run), else its equivalent."""
    script = Path(sys.executable).parent / "flexo"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from flexo.cli import main; sys.exit(main(sys.argv[1:]))"]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `flexo` subprocess: this one, with this checkout first on the path."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


# ------------------------------------------------------------------------------------------ scoring
def direct_rolling_logprobs(model, ids: list[int], prefix: int, max_len: int) -> list[float]:
    """log p(ids[j] | its context) for every token, scored in chunks of `max_len` predictions: the first
    chunk reads the prefix token then ids, every later chunk reads the `max_len` tokens before its end."""
    import torch

    out: list[float] = []
    start = 0
    with torch.no_grad():
        while start < len(ids):
            end = min(start + max_len, len(ids))
            inp = [prefix] + ids[:end - 1] if start == 0 else ids[end - max_len - 1:end - 1]
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].double(), dim=-1)
            for k, j in enumerate(range(start, end)):
                out.append(float(logp[len(inp) - (end - start) + k, ids[j]]))
            start = end
    return out


# ------------------------------------------------------------------------ git, DVC and Prefect in clones
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def sh(root: Path, *cmd: str, check: bool = True):
    """A command in `root` as a user's shell runs it: the venv's tools first on PATH, DVC quiet and offline."""
    import subprocess

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(DVC_NO_ANALYTICS="1", FLEXO_DOWNLOADS=str(download_cache()),
               DVC_SITE_CACHE_DIR=str(Path(root) / ".cache" / "dvc-site"))
    r = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ------------------------------------------------------------------------------ a federation of clones
def federation_origin(tiny: Path, root: Path, dvc_remote: Path) -> Path:
    """The project as its maintainers commit it: tiny params, this repository's pipeline and code, a DVC
    remote; no data, no models (owners' inbox folders hold only their .gitkeep)."""
    root.mkdir(parents=True)
    for name in ("params.yaml",):
        shutil.copy(tiny / name, root / name)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "prefect.yaml"):
        shutil.copy(REPO / name, root / name)
    for package in ("flexo", "stages", "flows"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    for owner in ("alpha", "beta"):
        (root / "data" / "owners" / owner).mkdir(parents=True)
        (root / "data" / "owners" / owner / ".gitkeep").touch()
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "config", "core.analytics", "false")
    sh(root, "dvc", "remote", "add", "-d", "store", str(dvc_remote))
    sh(root, "git", "add", "-A")
    sh(root, *GIT, "commit", "-qm", "flexo project")
    return root


def git_clone(remote: Path, dst: Path) -> Path:
    sh(remote.parent, "git", "clone", "-q", str(remote), str(dst))
    return dst


PUBLIC_OUTPUTS = ("data/curated/public", "data/heldout/public", "models/tokenizer", "models/public",
                  "models/router/public.safetensors", "models/router/public.json")


def public_built_as_dvc_would(tiny: Path, clone: Path) -> None:
    """The shared fixture's public artifacts in `clone`, recorded in its dvc.lock as if its public stages
    had run there (the public text of the tiny project is not a packaged source a stage could fetch)."""
    for rel in PUBLIC_OUTPUTS:
        src, dst = tiny / rel, clone / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    sh(clone, "dvc", "commit", "--force", "--quiet", "curate_public", "tokenizer", "embed_public", "train_public")


def owner_clone(remote: Path, dst: Path, tiny, owner: str) -> Path:
    """An owner's machine: a clone holding only that owner's own documents."""
    git_clone(remote, dst)
    shutil.rmtree(dst / "data" / "owners" / owner)
    shutil.copytree(tiny.owner_inbox(owner), dst / "data" / "owners" / owner)
    return dst


# ------------------------------------------------------------------- checkpoints from outside flexo
# The checkpoints' shapes: params.yaml's `model` section must say the same (flexo/checkpoint.py SAME).
SHAPES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, rms_norm_eps=1e-5, max_position_embeddings=512,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
VOCAB = 640  # the embedding has more rows than the tokenizer has tokens, as OLMo-2's (100352 vs 100278)


def own_tokenizer():
    """A tokenizer unlike flexo's: its own vocabulary (Metaspace BPE), `</s>` as EOS, `<pad>` as pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>", "<pad>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789"))
    bpe.train_from_iterator(prose_documents()[:200], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def write_checkpoint(folder: Path, kind: str, dtype=None, tok=None, **config) -> Path:
    """A tiny random `Olmo2ForCausalLM` (kind olmo2) or 3-expert `FlexOlmoForCausalLM` (flex_olmo) saved with its
    own tokenizer, as a user's downloaded checkpoint folder is (flexo/checkpoint.py's input)."""
    import torch
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM

    dtype = dtype or torch.float32
    torch.manual_seed(0)
    tok = tok or own_tokenizer()
    ids = dict(vocab_size=VOCAB, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    if kind == "olmo2":
        model = Olmo2ForCausalLM(Olmo2Config(**{**SHAPES, **ids, **config}))
    else:
        model = FlexOlmoForCausalLM(FlexOlmoConfig(**{**SHAPES, **ids, "num_experts": 3, "num_experts_per_tok": 2,
                                                      **config}))
        with torch.no_grad():  # different experts, so masking them is visible
            for layer in model.model.layers:
                layer.mlp.experts.gate_up_proj.normal_(0, 0.2)
                layer.mlp.experts.down_proj.normal_(0, 0.2)
    model.to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
