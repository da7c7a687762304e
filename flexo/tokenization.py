"""The project's tokenizer as the stages use it: loading it and counting tokens.

The tokenizer itself is trained by the `tokenizer` stage on public text only (stages/tokenizer.py).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from flexo.errors import FlexoError
from flexo.layout import Layout

EOS = "<|endoftext|>"
# The pad token must differ from EOS: transformers gives the pad id an embedding `padding_idx`,
# which freezes that row; EOS has to stay trainable.
PAD = "<|pad|>"


def load_tokenizer(layout: Layout) -> PreTrainedTokenizerBase:
    from flexo.modeling import load_tokenizer_from

    if not (layout.tokenizer / "tokenizer.json").is_file():
        raise FlexoError(f"no tokenizer in {layout.tokenizer}: run `flexo tokenizer` first")
    return load_tokenizer_from(layout.tokenizer, fix="rerun `flexo tokenizer`")


def count_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def eos_documents(tokenizer, texts, max_tokens: int) -> list[list[int]]:
    """Each non-empty text's first `max_tokens` token ids after an EOS (the separator the models were
    trained with), as the per-document passes (router statistics, membership losses) feed them."""
    eos = tokenizer.eos_token_id
    return [[eos, *ids[:max_tokens]] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"] if ids]


def padded_batch(docs: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) of token-id lists right-padded with `pad_id` to the longest."""
    import torch

    width = max(map(len, docs))
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for j, d in enumerate(docs):
        ids[j, : len(d)] = torch.tensor(d)
        mask[j, : len(d)] = 1
    return ids, mask
