"""Stage `tokenizer`: a byte-level BPE tokenizer trained on the public train split only, or, when the
public model comes from a checkpoint (`model.init_from`), that checkpoint's own tokenizer.

    flexo tokenizer

No owner's data ever touches it (its DVC stage depends only on data/curated/public), so every owner
and the merged model share one vocabulary without leaking anything. Saved as a transformers tokenizer
in `models/tokenizer/` (loads with `AutoTokenizer.from_pretrained`). With `model.init_from` no BPE is
trained: the weights were trained with the checkpoint's token ids, so curation's token counts, the
owners' training and the evaluation must use exactly its tokenizer (flexo/checkpoint.py).
"""

from __future__ import annotations

import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from flexo import timings
from flexo.checkpoint import read_source, source_tokenizer
from flexo.data import read_split
from flexo.fsutil import OutputGuard, atomic_dir, write_json
from flexo.layout import Layout
from flexo.modeling import SUPPORT_FILES
from flexo.params import PUBLIC, Params
from flexo.project import stage_command
from flexo.tokenization import EOS, PAD, count_tokens


def tokenizer_guard() -> OutputGuard:
    """`models/tokenizer` may replace only an earlier tokenizer folder (tokenizer.json + our manifest)."""
    return OutputGuard("tokenizer", lambda p: (p / "tokenizer.json").is_file() and (p / "manifest.json").is_file(),
                       command="flexo tokenizer", files=(*SUPPORT_FILES, "manifest.json"))


def train_tokenizer(params: Params, layout: Layout) -> dict:
    started = time.time()
    tokenizer_guard().check(layout.tokenizer)
    texts = read_split(layout, PUBLIC, "train")
    if params.model.init_from:
        tok = source_tokenizer(read_source(params))
        provenance = {"from_checkpoint": params.model.init_from}
    else:
        tok = _train_bpe(params, texts)
        provenance = {"trained_on": "data/curated/public/train.jsonl"}
    n_tokens = count_tokens(tok, texts)
    chars = sum(map(len, texts))
    manifest = {
        **provenance,
        "vocab_size": len(tok),
        "documents": len(texts),
        "characters": chars,
        "tokens": n_tokens,
        "chars_per_token": round(chars / max(1, n_tokens), 3),
        "eos": tok.eos_token,
        "pad": tok.pad_token,
    }
    with atomic_dir(layout.tokenizer, tokenizer_guard()) as tmp:
        tok.save_pretrained(tmp)
        write_json(tmp / "manifest.json", manifest)
    timings.record(layout.root, "tokenizer", wall_s=round(time.time() - started, 1))
    return manifest


def _train_bpe(params: Params, texts: list[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=params.tokenizer.vocab_size,
        min_frequency=params.tokenizer.min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None)
    tok.model_max_length = 1_000_000  # lm-eval's rolling windows decide the length, not the tokenizer
    return tok


def add_cli(sub) -> None:
    stage_command(sub, "tokenizer", "train the shared BPE tokenizer on the public train split (or install "
                  "model.init_from's tokenizer)",
                  lambda args, project: train_tokenizer(project.params, project.layout))
