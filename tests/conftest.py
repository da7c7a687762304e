"""Shared fixtures: a tiny flexo project (2 owners, a 2-layer width-32 model) built once per session
through the real stage functions, so later-stage tests start from real artifacts in seconds."""

from __future__ import annotations

import os
import random
import sysconfig
from pathlib import Path

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
    import json

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
