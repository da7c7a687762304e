"""Loss-based membership inference: does a model tell an owner's training documents from its held-out ones?

The attack of Yeom et al. (2018): a model tends to assign its training documents a lower loss than unseen
documents of the same distribution, so the loss alone is a membership score. Its strength is the ROC AUC
of "lower loss ⇒ member": 0.5 when the model does not separate the two sets, 1.0 when every training
document has a lower loss than every held-out one.

- `document_losses`: the mean per-token negative log-likelihood (nats) of each document's first
  `max_tokens` tokens, each fed after an EOS (the separator the models were trained with; not scored).
- `auc`: the ROC AUC from the Mann–Whitney U statistic, ties counted 1/2, by an exact rank computation.
- `auc_interval`: a seeded percentile bootstrap interval for it, resampling documents within each set.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from flexo.tokenization import padded_batch


@torch.no_grad()
def document_losses(model, tokenizer, texts: Sequence[str], *, max_tokens: int, batch_size: int) -> list[float]:
    """Mean per-token NLL (nats) of each text's first `max_tokens` tokens, given an EOS before the first.

    Batches are right-padded with an attention mask: in a causal model a real token never attends to the
    padding after it, so a document's loss does not depend on what it is batched with."""
    if max_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_tokens and batch_size must be at least 1, got {max_tokens} and {batch_size}")
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"document {empty[0]} has no tokens: there is nothing to score")
    docs = [[eos, *x[:max_tokens]] for x in ids]
    model.eval()
    losses: list[float] = []
    for start in range(0, len(docs), batch_size):
        input_ids, mask = padded_batch(docs[start: start + batch_size], eos)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        # position t predicts token t + 1; a target counts when it is a real token (the EOS itself is never a target)
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        scored = mask[:, 1:].to(nll.dtype)
        losses += ((nll * scored).sum(1) / scored.sum(1)).tolist()
    return losses


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """ROC AUC of "lower loss ⇒ member": P(loss of a member < loss of a non-member), ties counting 1/2.

    From the Mann–Whitney U statistic: pool both sets, rank them (tied values get their average rank),
    then U = (sum of the members' ranks) − m(m+1)/2 counts the pairs where the member's loss is *higher*
    (ties 1/2), and AUC = 1 − U / (m·n). O((m+n) log(m+n)), exact."""
    m, n = len(members), len(nonmembers)
    if not m or not n:
        raise ValueError(f"auc needs members and non-members, got {m} and {n}")
    if any(math.isnan(x) for x in (*members, *nonmembers)):
        raise ValueError("auc: a loss is NaN")
    pooled = sorted([(x, True) for x in members] + [(x, False) for x in nonmembers], key=lambda p: p[0])
    member_rank_sum, i = 0.0, 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        average_rank = (i + 1 + j) / 2  # ranks i+1 … j, shared by the tied values
        member_rank_sum += average_rank * sum(is_member for _, is_member in pooled[i:j])
        i = j
    higher = member_rank_sum - m * (m + 1) / 2
    return 1.0 - higher / (m * n)


def auc_interval(members: Sequence[float], nonmembers: Sequence[float], *, level: float = 0.95,
                 resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval for `auc`: documents resampled with replacement within each set
    (seeded, so the same losses give the same interval)."""
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"auc_interval: level must be in (0, 1) and resamples ≥ 1, got {level} and {resamples}")
    rng = random.Random(seed)
    values = sorted(auc(rng.choices(members, k=len(members)), rng.choices(nonmembers, k=len(nonmembers)))
                    for _ in range(resamples))
    tail = (1 - level) / 2
    return values[round(tail * (resamples - 1))], values[round((1 - tail) * (resamples - 1))]
