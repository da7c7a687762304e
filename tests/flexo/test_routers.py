"""flexo.routers: the per-request opt-out mask (`runtime_opt_out`) — excluding every owner is the public
model, a mask limited to some layers touches only those routers, every refusal leaves no router patched —
and the expert-name checks that serving, attribution and evaluation share. (That the mask equals strict
removal with `flexo opt-out` is tested with the stage, in tests/stages/test_optout.py.)"""

from __future__ import annotations

import pytest
import torch

from flexo.errors import FlexoError
from flexo.modeling import load_model
from flexo.routers import check_exclusions, check_experts, routers, runtime_opt_out

EXPERTS = ["public", "alpha", "beta"]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(2, 500, (3, 40), generator=torch.Generator().manual_seed(1))


def test_routers_and_name_checks(merged):
    model = load_model(merged)
    found = routers(model)
    assert found == [layer.mlp.gate for layer in model.model.layers] and len(found) == 2
    assert check_experts(model, EXPERTS) == EXPERTS
    with pytest.raises(FlexoError, match="2 expert names"):
        check_experts(model, ["public", "alpha"])
    with pytest.raises(FlexoError, match="repeat a name"):
        check_experts(model, ["public", "alpha", "alpha"])
    assert check_exclusions(EXPERTS, ["beta", "alpha", "beta"]) == ["beta", "alpha"]  # in order, once each
    with pytest.raises(FlexoError, match=r"cannot exclude 'gamma': the experts of the server are \['public'"):
        check_exclusions(EXPERTS, ["gamma"], where="the server")
    with pytest.raises(FlexoError, match="has no FlexOlmo routers"):
        routers(torch.nn.Linear(2, 2))


def test_runtime_excluding_every_owner_is_the_public_model(ctx, merged, tokens):
    params, layout = ctx
    full = load_model(merged)
    with torch.no_grad():
        with runtime_opt_out(full, EXPERTS, ["alpha", "beta"]):
            masked = full(input_ids=tokens).logits
        public = load_model(layout.public_model)(input_ids=tokens).logits
    torch.testing.assert_close(masked, public, rtol=0, atol=1e-6)


def test_runtime_mask_in_chosen_layers_only(merged, tokens):
    """`layers` masks only those layers' routers: all of them = the opt-out, some = something between
    the full model and the opt-out, and only those routers are patched while active."""
    full = load_model(merged)
    n = len(full.model.layers)
    with torch.no_grad():
        before = full(input_ids=tokens).logits
        with runtime_opt_out(full, EXPERTS, ["beta"]):
            everywhere = full(input_ids=tokens).logits
        with runtime_opt_out(full, EXPERTS, ["beta"], layers=list(range(n))):
            all_listed = full(input_ids=tokens).logits
        with runtime_opt_out(full, EXPERTS, ["beta"], layers=[0]):
            assert ["forward" in m.mlp.gate.__dict__ for m in full.model.layers] == [True] + [False] * (n - 1)
            first_only = full(input_ids=tokens).logits
    torch.testing.assert_close(all_listed, everywhere, rtol=0, atol=0)
    assert not torch.allclose(first_only, before) and not torch.allclose(first_only, everywhere)
    with pytest.raises(FlexoError, match=rf"layers \[{n}\] out of range"):
        with runtime_opt_out(full, EXPERTS, ["beta"], layers=[n]):
            pass
    assert all("forward" not in m.mlp.gate.__dict__ for m in full.model.layers)


def test_runtime_refusals(merged):
    full = load_model(merged)
    with pytest.raises(FlexoError, match="gamma"):
        with runtime_opt_out(full, EXPERTS, ["gamma"]):
            pass
    with pytest.raises(FlexoError, match="public"):
        with runtime_opt_out(full, EXPERTS, ["public"]):
            pass
    with pytest.raises(FlexoError, match="3 experts"):
        with runtime_opt_out(full, ["public", "alpha"], ["alpha"]):
            pass
    with runtime_opt_out(full, EXPERTS, ["beta"]):
        with pytest.raises(FlexoError, match="already active"):
            with runtime_opt_out(full, EXPERTS, ["alpha"]):
                pass
    assert all("forward" not in m.mlp.gate.__dict__ for m in full.model.layers)


