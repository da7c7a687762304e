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
