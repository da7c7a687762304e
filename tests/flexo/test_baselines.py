"""Baselines: the model soup is the hand average of the expert FFNs; BTM's mixture math (all members or
top-k) matches a direct computation, a one-member BTM scores and generates exactly like lm-eval's HF
backend, its mixture decoding is the argmax of the posterior mixture; the routed baselines score like the
HF backend of the member (or weighted soup) the router picks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import direct_rolling_logprobs, edit_manifest, package_copy
from flexo.baselines import BTMLM, btm_total_loglikelihood, mixture_logprobs, model_soup
from flexo.routed import RoutedLM
from flexo.errors import FlexoError
from flexo.evaluation import evaluate_model, hf_lm, load_tokenizer_for, write_domain_tasks
from flexo.modeling import load_model, new_model, with_experts

MAX_LEN = 16  # short windows, so a document spans several of them


def _instance(kind: str, args: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def direct_sequence_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[j] | ids[:j]) for j ≥ 1, one forward pass."""
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


def posterior_mixture(per_member: list[list[float]], first_scored: int = 0, top_k: int = 0, prefix: int = 0) -> float:
    """Σ_t log Σ_i w_i,t p_i(x_t), w_t = softmax_i(−NLL_i(x_<t)), in plain Python, over t ≥ first_scored.

    `top_k` > 0: from t = `prefix` on only the top_k members by −NLL_i(x_<prefix) (ties: the earlier one)."""
    total = 0.0
    nll = [0.0] * len(per_member)
    active = list(range(len(per_member)))
    for t in range(len(per_member[0])):
        if t == prefix and top_k:
            active = sorted(sorted(active, key=lambda i: nll[i])[:top_k])
        z = [-nll[i] for i in active]
        m = max(z)
        w = [math.exp(v - m) for v in z]
        s = sum(w)
        p = sum(wi / s * math.exp(per_member[i][t]) for wi, i in zip(w, active))
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
    assert lm.generate_until([]) == []
    assert lm.get_model_info()["btm_top_k"] == 0
    topk = get_model("flexo-btm").create_from_arg_string(f"members={members},max_length=32,top_k=1,prefix_tokens=4",
                                                          {"batch_size": 2, "device": "cpu"})
    assert (topk.top_k, topk.prefix_tokens) == (1, 4)
    assert topk.get_model_info() == {"btm_members": ["member0", "member1"], "btm_max_length": 32, "btm_top_k": 1,
                                     "btm_prefix_tokens": 4}


# ------------------------------------------------------------------------------------------ BTM top-k
def _heldout_text(layout, owner: str, i: int = 0, chars: int = 400) -> str:
    return json.loads((layout.heldout(owner) / "test.jsonl").read_text().splitlines()[i])["text"][:chars]


def test_btm_top_k_of_all_members_is_plain_btm(parts):
    layout, tok, public, owners = parts
    members = [public, owners["alpha"], owners["beta"]]
    docs = [_heldout_text(layout, "alpha"), _heldout_text(layout, "beta")]
    kw = dict(tokenizer=tok, batch_size=3, max_length=MAX_LEN, device="cpu", prefix_tokens=5)
    plain, every, more = (BTMLM(members, top_k=k, **kw) for k in (0, 3, 7))
    reqs = [_instance("loglikelihood_rolling", (d,)) for d in docs]
    mc = [_instance("loglikelihood", ("Calculate 12 + 30. Answer:", c)) for c in (" 42", " 17")]
    want, want_mc = plain.loglikelihood_rolling(reqs), plain.loglikelihood(mc)
    for lm in (every, more):
        assert lm.loglikelihood_rolling(reqs) == want  # exactly: the same float64 arithmetic
        assert lm.loglikelihood(mc) == want_mc
        assert lm.member_rolling == plain.member_rolling
    with pytest.raises(FlexoError, match="top_k=-1"):
        BTMLM(members, top_k=-1, **kw)


def test_btm_top_k_matches_direct_computation(parts):
    layout, tok, public, owners = parts
    members = [public, owners["alpha"], owners["beta"]]
    text = _heldout_text(layout, "beta")
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 3 * MAX_LEN
    per_member = [direct_rolling_logprobs(m, ids, tok.eos_token_id, MAX_LEN) for m in members]
    kw = dict(tokenizer=tok, batch_size=3, max_length=MAX_LEN, device="cpu")
    req = [_instance("loglikelihood_rolling", (text,))]
    (plain,) = (all_btm := BTMLM(members, **kw)).loglikelihood_rolling(req)
    p, got = 20, {}  # the choice falls inside the second window: the posterior spans windows
    for k in (1, 2):
        lm = BTMLM(members, top_k=k, prefix_tokens=p, **kw)
        (got[k],) = lm.loglikelihood_rolling(req)
        assert got[k] == pytest.approx(posterior_mixture(per_member, top_k=k, prefix=p), abs=1e-4)
        assert abs(got[k] - plain) > 1e-3  # dropping members changed the score
        assert lm.member_rolling == all_btm.member_rolling  # every member's own total is still recorded
    # top-1, by hand: the all-member mixture before the prefix, the best member alone after it.
    best = max(range(3), key=lambda i: sum(per_member[i][:p]))
    assert got[1] == pytest.approx(posterior_mixture([lp[:p] for lp in per_member]) + sum(per_member[best][p:]),
                                   abs=1e-4)
    # loglikelihood: the k members are those with the highest posterior after the context.
    ctx = "Calculate 12 + 30. Answer:"
    ctx_ids = tok.encode(ctx, add_special_tokens=False)
    for k in (1, 2):
        lm = BTMLM(members, top_k=k, prefix_tokens=p, **{**kw, "max_length": 64})  # the whole context fits
        for c in (" 42", " forty"):
            ids = ctx_ids + tok.encode(ctx + c, add_special_tokens=False)[len(ctx_ids):]
            per = [direct_sequence_logprobs(m, ids) for m in members]
            ((ll, _),) = lm.loglikelihood([_instance("loglikelihood", (ctx, c))])
            n = len(ctx_ids) - 1
            assert ll == pytest.approx(posterior_mixture(per, first_scored=n, top_k=k, prefix=n), abs=1e-4)


# ------------------------------------------------------------------------------------------ generation
def _generate(lm, context: str, **gen_kwargs) -> str:
    (text,) = lm.generate_until([_instance("generate_until", (context, {"do_sample": False, **gen_kwargs}))])
    return text


@torch.no_grad()
def direct_mixture_greedy(models, ids: list[int], n: int, eos: int, top_k: int = 0,
                          frozen_posterior: bool = False) -> list[int]:
    """Greedy tokens of the posterior mixture, every step from full forward passes (no cache), in float64.

    `frozen_posterior`: the wrong variant whose weights stay the posterior after the context."""
    ids, out, active = list(ids), [], list(range(len(models)))
    for step in range(n):
        logps = [torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), dim=-1) for m in models]
        if step == 0 or not frozen_posterior:
            ll = [sum(float(lp[j - 1, ids[j]]) for j in range(1, len(ids))) for lp in logps]
        if step == 0 and top_k:
            active = sorted(sorted(active, key=lambda i: -ll[i])[:top_k])
        lse = torch.logsumexp(torch.tensor([ll[i] for i in active], dtype=torch.float64), 0)
        mix = torch.logsumexp(torch.stack([ll[i] - lse + logps[i][-1] for i in active]), 0)
        token = int(mix.argmax())
        if token == eos:
            break
        out.append(token)
        ids.append(token)
    return out


PROMPTS = ["Calculate 12 + 30. Answer:", "Calculate 7 * 8. Answer: 56\nCalculate 9 - 4. Answer:",
           "The import statement", "def f(x):\n    return"]


@pytest.fixture(scope="module")
def jittered(parts):
    """Three random 1-expert models of the tokenizer's vocabulary, each a small jitter of one random model.

    The trained tiny models greedily emit only spaces, which would make generation checks vacuous; these
    emit varied tokens, and being close to each other their posterior stays mixed, so the mixture's argmax
    differs from every member's own greedy choice.
    """
    config = with_experts(parts[2].config, 1, 1)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    base = new_model(config).eval()
    out = []
    for seed in (1, 2, 3):
        g, model = torch.Generator().manual_seed(seed), copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() > 1:
                    p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
        out.append(model)
    return out


def test_btm_one_member_generates_like_hflm(parts, jittered):
    layout, tok, public, owners = parts
    long_prompt = _heldout_text(layout, "alpha", chars=600)
    assert len(tok.encode(long_prompt)) > 40  # left-truncated to max_length − max_gen_toks, as HFLM does
    for model in (jittered[0], jittered[2], owners["beta"]):
        btm = BTMLM([model], tokenizer=tok, batch_size=1, max_length=48, device="cpu")
        hf = hf_lm(model, tok, batch_size=1, max_length=48)
        for prompt in (PROMPTS[1], long_prompt):
            for kw in ({"until": [], "max_gen_toks": 12}, {"until": ["e", "\n"], "max_gen_toks": 20}):
                want = _generate(hf, prompt, **kw)
                assert _generate(btm, prompt, **kw) == want, (prompt, kw)
        assert _generate(btm, PROMPTS[1], until=[], max_gen_toks=12).strip() or model is owners["beta"]
    # max_gen_toks ≥ max_length (HFLM refuses it): at most max_length // 2 new tokens, the prompt kept.
    btm = BTMLM([jittered[0]], tokenizer=tok, batch_size=1, max_length=16, device="cpu")
    tokens = btm._greedy(btm.models, tok.encode(PROMPTS[1]), 8, [])
    assert len(tokens) == 8
    assert _generate(btm, PROMPTS[1], until=[], max_gen_toks=64) == tok.decode(tokens, skip_special_tokens=True)


def test_btm_generation_is_the_mixture_argmax(parts, jittered):
    tok = parts[1]
    lm = BTMLM(jittered, tokenizer=tok, batch_size=2, max_length=64, device="cpu")
    own = [BTMLM([m], tokenizer=tok, batch_size=1, max_length=64, device="cpu") for m in jittered]
    n, mixed, updated = 8, False, False
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        want = direct_mixture_greedy(jittered, ids, n, tok.eos_token_id)
        assert len(want) == n and lm._greedy(lm.models, ids, n, []) == want
        assert _generate(lm, prompt, until=[], max_gen_toks=n) == tok.decode(want, skip_special_tokens=True)
        mixed |= all(o._greedy(o.models, ids, n, []) != want for o in own)
        updated |= direct_mixture_greedy(jittered, ids, n, tok.eos_token_id, frozen_posterior=True) != want
    assert mixed  # for some prompt the mixture decodes a text none of its members would
    assert updated  # and for some the generated tokens' own likelihoods moved the weights enough to matter
    # top-1: the member most likely to have written the context generates alone, as its HF greedy does.
    top1 = BTMLM(jittered, tokenizer=tok, batch_size=2, max_length=64, device="cpu", top_k=1)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        best = max(range(3), key=lambda i: sum(direct_sequence_logprobs(jittered[i], ids)))
        want = _generate(hf_lm(jittered[best], tok, batch_size=1, max_length=64), prompt, until=[], max_gen_toks=n)
        assert _generate(top1, prompt, until=[], max_gen_toks=n) == want
    # top-2: the mixture of the two most likely members, renormalised.
    ids = tok.encode(PROMPTS[0])
    assert top1._greedy(top1.models, ids, n, [], top_k=2) == direct_mixture_greedy(jittered, ids, n,
                                                                                  tok.eos_token_id, top_k=2)


def test_btm_generation_stops_at_stop_strings_and_refuses_sampling(parts, jittered):
    tok = parts[1]
    lm = BTMLM(jittered, tokenizer=tok, batch_size=2, max_length=64, device="cpu")
    prompt = PROMPTS[2]
    full = _generate(lm, prompt, until=[], max_gen_toks=16)
    assert len(full) >= 12
    stop = full[len(full) // 2:len(full) // 2 + 2]
    want = full.split(stop)[0]
    assert want != full
    assert _generate(lm, prompt, until=[stop], max_gen_toks=16) == want
    assert _generate(lm, prompt, until=stop, max_gen_toks=16) == want  # a single string, as tasks may give it
    assert _generate(lm, prompt, until=["never-there", stop], max_gen_toks=16) == want
    # Decoding stopped once the stop string was generated, not after all 16 tokens.
    tokens = lm._greedy(lm.models, tok.encode(prompt), 16, [stop])
    assert len(tokens) < 16 and stop in tok.decode(tokens) and stop not in tok.decode(tokens[:-1])
    with pytest.raises(FlexoError, match="greedy"):
        _generate(lm, prompt, do_sample=True, temperature=0.7)
    with pytest.raises(FlexoError, match="greedy"):
        lm.generate_until([_instance("generate_until", (prompt, {"temperature": 0.5}))])
    # do_sample=False wins over a temperature (lm-eval's rule): greedy.
    assert _generate(lm, prompt, until=[], max_gen_toks=16, temperature=0.7) == full


# ------------------------------------------------------------------------------------------ routed baselines
def test_routed_one_scores_like_hflm_of_the_chosen_member(parts, tmp_path):
    layout, tok, public, owners = parts
    tasks = write_domain_tasks(layout, ["beta"], tmp_path / "tasks", cache_dir=tmp_path / "ds")
    kw = dict(limit=3, batch_size=4, max_length=32)
    hf = evaluate_model(owners["beta"], tok, tasks, **kw)
    routed = RoutedLM([public, owners["beta"]], lambda ids: torch.tensor([0.2, 0.8]), tokenizer=tok,
                      names=["public", "beta"], batch_size=4, max_length=32, device="cpu")
    got = evaluate_model(routed, None, tasks, **kw)
    assert got["beta"] == pytest.approx(hf["beta"], abs=1e-5)
    assert routed.routed_counts() == {"public": 0, "beta": 3}
    assert routed.get_model_info()["routed_counts"] == {"public": 0, "beta": 3}
    assert all(w == pytest.approx([0.2, 0.8]) for w in routed.route_weights.values())


def route_to_second(ids: list[int]) -> torch.Tensor:
    return torch.tensor([0.0, 1.0])


def test_routed_is_an_lm_eval_model(parts):
    import os

    from lm_eval.api.registry import get_model

    layout, tok = parts[0], parts[1]
    members = os.pathsep.join([str(layout.public_model), str(layout.expert("beta") / "model")])
    args = {"batch_size": 2, "device": "cpu", "max_batch_size": None}
    lm = get_model("flexo-routed").create_from_arg_string(
        f"members={members},route={__name__}:route_to_second,max_length=32,prefix_tokens=4", args)
    assert isinstance(lm, RoutedLM) and (lm.mode, lm.prefix_tokens, lm.max_length) == ("one", 4, 32)
    doc = "Calculate 2 + 2. Answer: 4"
    (ll,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (doc,))])
    ids = tok.encode(doc, add_special_tokens=False)
    assert ll == pytest.approx(sum(direct_rolling_logprobs(lm.models[1], ids, tok.eos_token_id, 32)), abs=1e-4)
    assert lm.routed == {doc: 1} and lm.get_model_info()["routed_counts"] == {"member0": 0, "member1": 1}
    with pytest.raises(FlexoError, match="cannot be imported"):
        get_model("flexo-routed").create_from_arg_string(f"members={members},route=no_such_module:route", args)


def _arithmetic_router(tok, seen: list):
    """A toy classifier: arithmetic drills → member 1, anything else → member 0."""
    def route(ids):
        seen.append(list(ids))
        return torch.tensor([0.0, 1.0]) if "Calculate" in tok.decode(ids) else torch.tensor([1.0, 0.0])
    return route


def test_routed_one_routes_each_document(parts, jittered):
    layout, tok, public, owners = parts
    members = [public, owners["beta"]]
    docs = [_heldout_text(layout, "alpha"), _heldout_text(layout, "beta"), _heldout_text(layout, "alpha", 1)]
    seen: list = []
    lm = RoutedLM(members, _arithmetic_router(tok, seen), tokenizer=tok, batch_size=3, max_length=MAX_LEN,
                  prefix_tokens=6, device="cpu")
    got = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (d,)) for d in docs])
    assert [lm.routed[d] for d in docs] == [0, 1, 0]
    for doc, total in zip(docs, got):
        ids = tok.encode(doc, add_special_tokens=False)
        assert ids[:6] in seen  # the router read the document's first prefix_tokens tokens
        want = sum(direct_rolling_logprobs(members[lm.routed[doc]], ids, tok.eos_token_id, MAX_LEN))
        assert total == pytest.approx(want, abs=1e-4)
    # loglikelihood: the context routes; the chosen member scores the continuation alone.
    ctx = "Calculate 12 + 30. Answer:"
    ctx_ids = tok.encode(ctx, add_special_tokens=False)
    wide = RoutedLM(members, _arithmetic_router(tok, seen), tokenizer=tok, max_length=64, device="cpu")
    for c in (" 42", " forty"):
        ids = ctx_ids + tok.encode(ctx + c, add_special_tokens=False)[len(ctx_ids):]
        ((ll, greedy),) = wide.loglikelihood([_instance("loglikelihood", (ctx, c))])
        assert ll == pytest.approx(sum(direct_sequence_logprobs(owners["beta"], ids)[len(ctx_ids) - 1:]), abs=1e-4)
        with torch.no_grad():
            argmax = owners["beta"](torch.tensor([ids[:-1]])).logits[0, len(ctx_ids) - 1:].argmax(-1).tolist()
        assert greedy == (argmax == ids[len(ctx_ids):])
    assert wide.routed[ctx] == 1 and seen[-1] == ctx_ids
    # generation: the chosen member's HF greedy continuation.
    for prompt, member in ((PROMPTS[0], owners["beta"]), (PROMPTS[2], public)):
        want = _generate(hf_lm(member, tok, batch_size=1, max_length=MAX_LEN), prompt, until=["\n"], max_gen_toks=8)
        assert _generate(lm, prompt, until=["\n"], max_gen_toks=8) == want
    to_second = RoutedLM(jittered[:2], lambda ids: torch.tensor([0.0, 1.0]), tokenizer=tok, max_length=64, device="cpu")
    want = _generate(hf_lm(jittered[1], tok, batch_size=1, max_length=64), PROMPTS[2], until=[], max_gen_toks=10)
    assert want.strip() and _generate(to_second, PROMPTS[2], until=[], max_gen_toks=10) == want
    with pytest.raises(FlexoError, match="one non-negative probability per member"):
        RoutedLM(members, lambda ids: torch.ones(3), tokenizer=tok, device="cpu").loglikelihood_rolling(
            [_instance("loglikelihood_rolling", (docs[0],))])
    with pytest.raises(FlexoError, match="mode 'avg'"):
        RoutedLM(members, lambda ids: torch.ones(2), tokenizer=tok, device="cpu", mode="avg")


def test_routed_soup_is_the_weighted_model_soup(parts):
    layout, tok, public, owners = parts
    members = [public, owners["alpha"], owners["beta"]]
    packages = [layout.expert("alpha"), layout.expert("beta")]
    docs = [_heldout_text(layout, "alpha", 0, 200), _heldout_text(layout, "beta", 0, 200),
            _heldout_text(layout, "alpha", 1, 200)]
    plan = {0: [0.0, 1.0, 0.0], 1: [1.0, 1.0, 1.0], 2: [0.0, 0.0, 2.0]}  # alpha's FFN only, uniform, beta's only
    prefix = {tuple(tok.encode(d, add_special_tokens=False)[:8]): i for i, d in enumerate(docs)}
    lm = RoutedLM(members, lambda ids: torch.tensor(plan[prefix[tuple(ids)]]), tokenizer=tok,
                  names=["public", "alpha", "beta"], batch_size=2, max_length=MAX_LEN, mode="soup", prefix_tokens=8,
                  device="cpu")
    got = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (d,)) for d in docs])
    for i, doc in enumerate(docs):
        soup = model_soup(layout.public_model, packages, weights=plan[i])
        ids = tok.encode(doc, add_special_tokens=False)
        assert got[i] == pytest.approx(sum(direct_rolling_logprobs(soup, ids, tok.eos_token_id, MAX_LEN)), abs=1e-4)
    assert lm.routed_counts() == {"public": 1, "alpha": 1, "beta": 1}  # uniform: the first maximum, public
    assert lm.route_weights[docs[1]] == pytest.approx([1 / 3] * 3)
    # The soup model left after the last document is exactly that document's soup: nothing accumulates.
    last = model_soup(layout.public_model, packages, weights=plan[2]).state_dict()
    for key, value in lm.soup.state_dict().items():
        torch.testing.assert_close(value, last[key], rtol=0, atol=1e-6)
    # generation: the uniform soup's HF greedy continuation.
    prompt = docs[1][:80]
    prefix[tuple(tok.encode(prompt))] = 1
    uniform = hf_lm(model_soup(layout.public_model, packages), tok, batch_size=1, max_length=MAX_LEN)
    assert _generate(lm, prompt, until=[], max_gen_toks=6) == _generate(uniform, prompt, until=[], max_gen_toks=6)
    # refusals: no public 1-expert member first; an owner trained against another public model.
    with pytest.raises(FlexoError, match="public 1-expert model first"):
        RoutedLM([owners["alpha"], owners["beta"]], lambda ids: torch.ones(2), tokenizer=tok, mode="soup", device="cpu")
    other = copy.deepcopy(owners["beta"])
    with torch.no_grad():
        other.model.layers[0].mlp.experts.down_proj[0].add_(0.01)
    with pytest.raises(FlexoError, match="another public model"):
        RoutedLM([public, other], lambda ids: torch.ones(2), tokenizer=tok, mode="soup", device="cpu")


def test_top_k_replay_equals_running_btm_top_k(parts):
    """BTM top-2 replayed from an all-member pass's per-token log-probs = a BTM top-2 pass of its own."""
    from lm_eval.api.instance import Instance

    from flexo.baselines import MixtureReplayLM

    layout, tok, public, owners = parts
    members = [public, *owners.values()]
    docs = [json.loads(line)["text"] for line in (layout.heldout("beta") / "test.jsonl").read_text().splitlines()][:3]
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    full = BTMLM(members, tokenizer=tok, max_length=MAX_LEN)
    full.loglikelihood_rolling(reqs)
    top2 = BTMLM(members, tokenizer=tok, max_length=MAX_LEN, top_k=2, prefix_tokens=8).loglikelihood_rolling(reqs)
    replay = MixtureReplayLM(full.member_tokens, top_k=2, prefix_tokens=8).loglikelihood_rolling(reqs)
    assert replay == pytest.approx(top2, abs=1e-9)
    assert replay != pytest.approx(full.loglikelihood_rolling(reqs), abs=1e-6)  # top-2 is not all three
    everyone = MixtureReplayLM(full.member_tokens, top_k=3, prefix_tokens=8).loglikelihood_rolling(reqs)
    assert everyone == pytest.approx(full.loglikelihood_rolling(reqs), abs=1e-9)
    with pytest.raises(FlexoError, match="no recorded score"):
        MixtureReplayLM({}, top_k=2, prefix_tokens=8).loglikelihood_rolling(reqs[:1])
