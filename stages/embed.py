"""Stage `embed`: the domain router embedding of one owner (or `public`).

    flexo embed --owner math

r = mean of an off-the-shelf sentence embedder's vectors over a seeded sample of the owner's train
documents (FlexOlmo §3.3; the paper uses GritLM-7B, whose width equals the model's), with the
embedder of :mod:`flexo.embedder` (projected to the model width when the widths differ). Reads only
this owner's train split. Writes `models/router/<name>.safetensors` (`router_row`, scaled to
`embed.row_norm`, and the raw `embedder_mean`) and `<name>.json`.
"""

from __future__ import annotations

import random
import time

from safetensors.torch import save_file

from flexo import timings
from flexo.data import read_split
from flexo.embedder import embed_texts, load_embedder, projection
from flexo.fsutil import atomic_path, write_json
from flexo.layout import Layout
from flexo.params import Params
from flexo.project import stage_command



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
    }
    out = layout.router_embedding(name)
    with atomic_path(out) as tmp:
        save_file({"router_row": row.contiguous(), "embedder_mean": mean.contiguous()}, str(tmp),
                  metadata={"name": name})  # one key: a metadata map is written in random order (see modeling.py)
    write_json(out.with_suffix(".json"), meta)
    timings.record(layout.root, f"embed@{name}", wall_s=round(time.time() - started, 1))
    return meta


def add_cli(sub) -> None:
    stage_command(sub, "embed", "compute one owner's (or the public) domain router embedding",
                  lambda args, project: embed(args.owner, project.params, project.layout),
                  owner="an owner from params.yaml, or `public`")
