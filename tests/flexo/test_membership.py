"""flexo.membership: the Mann–Whitney AUC against hand-computed values (ties included), its bootstrap
interval, and per-document losses equal to a direct computation with the model, whatever the batching."""

from __future__ import annotations

import pytest
import torch

from flexo.membership import auc, auc_interval, document_losses


# ------------------------------------------------------------------------------------------------ auc
def test_auc_by_hand_with_ties():
    # pairs (member, non-member) where the member's loss is lower: 1 < 2, 4, 5 (3); 2 = 2 (½), 2 < 4, 5 (2);
    # 3 < 4, 5 (2) → 7.5 of 9 pairs
    assert auc([1, 2, 3], [2, 4, 5]) == pytest.approx(7.5 / 9)
    assert auc([2, 4, 5], [1, 2, 3]) == pytest.approx(1.5 / 9)  # the sets swapped: 1 − 7.5/9


def test_auc_extremes_and_chance():
    assert auc([0.1, 0.2, 0.3], [1.0, 2.0]) == 1.0  # every member below every non-member
    assert auc([1.0, 2.0], [0.1, 0.2, 0.3]) == 0.0
    assert auc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5  # all tied
    assert auc([1, 4], [2, 3]) == 0.5  # interleaved: 1 < 2, 3 and 4 > 2, 3
    assert auc([3.0], [3.0]) == 0.5


def test_auc_matches_the_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    members = torch.randint(0, 20, (37,), generator=g).tolist()  # many ties
    nonmembers = torch.randint(5, 30, (23,), generator=g).tolist()
    pairs = sum((m < n) + 0.5 * (m == n) for m in members for n in nonmembers)
    assert auc(members, nonmembers) == pytest.approx(pairs / (37 * 23), abs=1e-12)


def test_auc_refuses_empty_or_nan():
    with pytest.raises(ValueError, match="members and non-members"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auc([float("nan")], [1.0])


def test_bootstrap_interval_is_seeded_and_brackets_the_auc():
    g = torch.Generator().manual_seed(1)
    members = (torch.randn(40, generator=g)).tolist()
    nonmembers = (torch.randn(40, generator=g) + 1).tolist()
    lo, hi = auc_interval(members, nonmembers, resamples=300, seed=3)
    assert 0 <= lo < auc(members, nonmembers) < hi <= 1
    assert auc_interval(members, nonmembers, resamples=300, seed=3) == (lo, hi)
    assert auc_interval([0.1, 0.2], [1.0, 2.0], resamples=50) == (1.0, 1.0)  # perfectly separated: always 1


# -------------------------------------------------------------------------------------------- losses
class CharTokenizer:
    """One token per character (byte value + 1); token 0 is EOS. Answers like a transformers tokenizer."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[min(ord(c), 126) + 1 for c in t] for t in texts]}


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import FlexOlmoForCausalLM

    from flexo.modeling import model_config
    from flexo.params import ModelParams

    torch.manual_seed(0)
    config = model_config(ModelParams(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32),
                          vocab_size=128, pad_id=0, eos_id=0, num_experts=2, top_k=1)
    return FlexOlmoForCausalLM(config).eval()


def test_losses_equal_a_direct_computation(tiny_model):
    tok = CharTokenizer()
    texts = ["the quick brown fox jumps over the lazy dog", "short", "a middling text of some length"]
    got = document_losses(tiny_model, tok, texts, max_tokens=20, batch_size=2)  # padding in the first batch
    assert len(got) == 3
    for text, loss in zip(texts, got):
        ids = torch.tensor([[0, *tok([text])["input_ids"][0][:20]]])
        with torch.no_grad():
            logits = tiny_model(input_ids=ids).logits[0, :-1]
        direct = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:]).item()
        assert loss == pytest.approx(direct, abs=1e-5)
    # batching changes nothing, and the same inputs give the same numbers
    alone = document_losses(tiny_model, tok, texts, max_tokens=20, batch_size=1)
    assert got == pytest.approx(alone, abs=1e-5)
    assert document_losses(tiny_model, tok, texts, max_tokens=20, batch_size=2) == got


def test_losses_refuse_an_empty_document(tiny_model):
    with pytest.raises(ValueError, match="document 1 has no tokens"):
        document_losses(tiny_model, CharTokenizer(), ["abc", ""], max_tokens=8, batch_size=2)
