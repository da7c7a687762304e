"""Baselines: the model soup is the hand average of the expert FFNs; BTM's mixture math matches a direct
computation, and a one-member BTM scores exactly like lm-eval's HF backend."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import direct_rolling_logprobs, edit_manifest, package_copy
from flexo.baselines import BTMLM, btm_total_loglikelihood, mixture_logprobs, model_soup
from flexo.errors import FlexoError
from flexo.evaluation import evaluate_model, load_tokenizer_for, write_domain_tasks
from flexo.modeling import load_model

MAX_LEN = 16  # short windows, so a document spans several of them


def _instance(kind: str, args: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def direct_sequence_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[j] | ids[:j]) for j ≥ 1, one forward pass."""
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


def posterior_mixture(per_member: list[list[float]], first_scored: int = 0) -> float:
    """Σ_t log Σ_i w_i,t p_i(x_t), w_t = softmax_i(−NLL_i(x_<t)), in plain Python, over t ≥ first_scored."""
    total = 0.0
    nll = [0.0] * len(per_member)
    for t in range(len(per_member[0])):
        z = [-v for v in nll]
        m = max(z)
        w = [math.exp(v - m) for v in z]
        s = sum(w)
        p = sum(wi / s * math.exp(lp[t]) for wi, lp in zip(w, per_member))
        if t >= first_scored:
            total += math.log(p)
        nll = [v - lp[t] for v, lp in zip(nll, per_member)]
    return total


@pytest.fixture(scope="module")
def parts(tiny_project):
    layout = tiny_project
    tok = load_tokenizer_for(layout.public_model)
    public = load_model(layout.public_model)
    owners = {o: load_model(layout.expert(o) / "model") for o in ("alpha", "beta")}
    return layout, tok, public, owners


def test_soup_is_the_hand_average(parts):
    layout, _, public, owners = parts
    soup = model_soup(layout.public_model, [layout.expert("alpha"), layout.expert("beta")])
    assert soup.config.num_experts == 1 and soup.config.num_experts_per_tok == 1
    pub_sd, soup_sd = public.state_dict(), soup.state_dict()
    for key, value in soup_sd.items():
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            hand = (pub_sd[key][0] + owners["alpha"].state_dict()[key][1] + owners["beta"].state_dict()[key][1]) / 3
            torch.testing.assert_close(value[0], hand, rtol=0, atol=1e-6)
            assert not torch.equal(value[0], pub_sd[key][0])  # the owners' experts moved it
        else:
            assert torch.equal(value, pub_sd[key]), key  # everything else is the public model's
    # From the owners' model folders instead of their packages: the same soup.
    again = model_soup(layout.public_model, [layout.expert("alpha") / "model", layout.expert("beta") / "model"])
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, soup_sd[key], rtol=0, atol=0)
    # Weighted: all weight on the public FFN gives back the public model.
    pub_only = model_soup(layout.public_model, [layout.expert("alpha")], weights=[1.0, 0.0])
    for key, value in pub_only.state_dict().items():
        torch.testing.assert_close(value, pub_sd[key], rtol=0, atol=0)
    with pytest.raises(FlexoError, match="weights"):
        model_soup(layout.public_model, [layout.expert("alpha")], weights=[1.0])


def test_soup_refuses_a_package_of_another_public_model(parts, tmp_path):
    layout = parts[0]
    pkg = package_copy(layout, "alpha", tmp_path / "alpha")
    edit_manifest(pkg, public_fingerprint="0" * 64)
    with pytest.raises(FlexoError, match="another public model"):
        model_soup(layout.public_model, [pkg])


def test_mixture_logprobs_is_the_posterior_mixture():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 7, 5, generator=g, dtype=torch.float64), dim=-1)[..., 0]  # [M=3, T=7]
    mix = mixture_logprobs(lp)
    assert mix.shape == (7,)
    # t = 0: uniform weights
    assert float(mix[0]) == pytest.approx(math.log(sum(math.exp(float(v)) for v in lp[:, 0]) / 3), abs=1e-12)
    assert float(mix.sum()) == pytest.approx(posterior_mixture(lp.tolist()), abs=1e-10)
    # Bayes: the product of the mixture conditionals is the uniform mixture of the members' joint likelihoods.
    assert float(mix.sum()) == pytest.approx(btm_total_loglikelihood(lp.sum(dim=1).tolist()), abs=1e-10)
    # One member: the mixture is that member.
    torch.testing.assert_close(mixture_logprobs(lp[:1]), lp[0])


def test_btm_rolling_matches_direct_computation(parts):
    layout, tok, public, owners = parts
    text = json.loads((layout.heldout("alpha") / "test.jsonl").read_text().splitlines()[0])["text"][:400]
    members = [public, owners["alpha"]]
    lm = BTMLM(members, tokenizer=tok, batch_size=3, max_length=MAX_LEN, device="cpu")
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 3 * MAX_LEN  # several windows, the last one partial or full
    assert len(lm.rolling_windows(text)) == math.ceil(len(ids) / MAX_LEN)
    per_member = [direct_rolling_logprobs(m, ids, tok.eos_token_id, MAX_LEN) for m in members]
    (got,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    assert got == pytest.approx(posterior_mixture(per_member), abs=1e-4)
    assert got == pytest.approx(btm_total_loglikelihood([sum(p) for p in per_member]), abs=1e-4)
    # The mixture beats neither member by more than log 2 nats, and is at least as good as the worse one.
    assert max(map(sum, per_member)) - math.log(2) - 1e-6 <= got
    assert got >= min(map(sum, per_member)) - 1e-6


def test_btm_loglikelihood_uses_the_context_as_text_so_far(parts):
    layout, tok, public, owners = parts
    members = [public, owners["alpha"], owners["beta"]]
    lm = BTMLM(members, tokenizer=tok, batch_size=2, max_length=64, device="cpu")
    ctx, conts = "Calculate 12 + 30. Answer:", [" 42", " 17", " forty"]
    got = lm.loglikelihood([_instance("loglikelihood", (ctx, c)) for c in conts])
    for c, (ll, greedy) in zip(conts, got):
        ctx_ids = tok.encode(ctx, add_special_tokens=False)
        whole = tok.encode(ctx + c, add_special_tokens=False)
        cont_ids = whole[len(ctx_ids):]
        ids = ctx_ids + cont_ids
        per_member = [direct_sequence_logprobs(m, ids) for m in members]
        want = posterior_mixture(per_member, first_scored=len(ctx_ids) - 1)
        assert ll == pytest.approx(want, abs=1e-4)
        assert isinstance(greedy, bool)
    # Empty context: the prefix (EOS) token is the context, uniform weights on the first token.
    ((ll0, _),) = lm.loglikelihood([_instance("loglikelihood", ("", "Calculate"))])
    ids = [tok.eos_token_id] + tok.encode("Calculate", add_special_tokens=False)
    assert ll0 == pytest.approx(posterior_mixture([direct_sequence_logprobs(m, ids) for m in members]), abs=1e-4)


def test_btm_with_one_member_scores_like_hflm(parts, tmp_path):
    layout, tok, public, _ = parts
    tasks = write_domain_tasks(layout, ["beta"], tmp_path / "tasks", cache_dir=tmp_path / "ds")
    kw = dict(limit=3, batch_size=4, max_length=32)
    hf = evaluate_model(public, tok, tasks, **kw)
    btm = evaluate_model(BTMLM([public], tokenizer=tok, batch_size=4, max_length=32, device="cpu"), None, tasks,
                         raw_out=tmp_path / "btm.json", **kw)
    assert btm["beta"] == pytest.approx(hf["beta"], abs=1e-5)
    raw = json.loads((tmp_path / "btm.json").read_text())
    assert raw["results"]["flexo_domain_beta"]["bits_per_byte,none"] == pytest.approx(btm["beta"])


def test_btm_is_an_lm_eval_model(parts):
    import os

    from lm_eval.api.registry import get_model

    layout = parts[0]
    members = os.pathsep.join([str(layout.public_model), str(layout.expert("beta") / "model")])
    lm = get_model("flexo-btm").create_from_arg_string(f"members={members},max_length=32",
                                                        {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    assert isinstance(lm, BTMLM) and len(lm.models) == 2 and lm.max_length == 32 and lm.batch_size == 2
    (ll,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", ("Calculate 2 + 2. Answer: 4",))])
    assert math.isfinite(ll) and ll < 0
    with pytest.raises(NotImplementedError):
        lm.generate_until([])
