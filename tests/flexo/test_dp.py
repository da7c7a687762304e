"""DP-SGD for experts (flexo/dp.py): per-document gradients are each document's own and clipped to the
norm, the clipping equals Opacus's, the accountant agrees with Google's, public text stays outside the
private part, and the refusals are one line."""

import copy

import pytest
import torch

from flexo import dp
from flexo.errors import FlexoError


def tiny_owner_model(tiny_project):
    from flexo.modeling import coupled_model, load_model
    from stages.train_expert import owner_trainables

    public = load_model(tiny_project.public_model)
    model = coupled_model(public, torch.zeros(public.config.hidden_size))
    trainable, masks = owner_trainables(model)
    for name, mask in masks.items():
        trainable[name].register_hook(lambda g, m=mask: g * m)
    return model, trainable, masks


def test_per_document_gradients_are_each_documents_own_and_clipped(tiny_project):
    from flexo.data import read_split
    from flexo.tokenization import load_tokenizer

    layout = tiny_project
    tok = load_tokenizer(layout)
    examples = dp.document_examples(tok, read_split(layout, "beta", "train")[:5], 64, 2)
    model, trainable, masks = tiny_owner_model(tiny_project)
    model.train()
    loss_of = lambda i: model(input_ids=examples.blocks[i], labels=examples.labels[i]).loss  # noqa: E731

    # Unclipped (C = ∞), the sum over documents is the gradient of the sum of the documents' own losses
    # (one graph, one backward pass): the per-document passes lose or add nothing.
    unclipped, norms = dp.clipped_sum(loss_of, list(range(len(examples))), trainable, max_norm=float("inf"))
    total = 0
    for x, y in zip(examples.blocks, examples.labels):  # one graph, every document's mean token loss added up
        logits = model(input_ids=x).logits[:, :-1]
        target = y[:, 1:]
        lp = torch.log_softmax(logits.float(), dim=-1)
        keep = target != -100
        total = total - lp[keep].gather(1, target[keep][:, None]).sum() / keep.sum()
    for p in trainable.values():
        p.grad = None
    total.backward()
    for name, p in trainable.items():
        assert torch.allclose(unclipped[name], p.grad, atol=1e-5, rtol=1e-4), name
        assert torch.equal(unclipped[name][0], torch.zeros_like(unclipped[name][0]))  # the public slice: masked
        p.grad = None

    # Each document's gradient alone, by its own backward pass, clipped to C = half its norm
    for i in range(len(examples)):
        alone, (norm,) = dp.clipped_sum(loss_of, [i], trainable, max_norm=float("inf"))
        assert norm == pytest.approx(norms[i], rel=1e-5)
        c = norm / 2
        clipped, _ = dp.clipped_sum(loss_of, [i], trainable, max_norm=c)
        got = float(torch.sqrt(sum((g.double() ** 2).sum() for g in clipped.values())))
        assert got == pytest.approx(c, rel=1e-4)
        for name in trainable:
            assert torch.allclose(clipped[name], alone[name] * (c / norm), atol=1e-7), name


def test_clipping_equals_opacus_on_a_layer_it_supports():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    c = 0.5

    ours_model = copy.deepcopy(layer)
    params = dict(ours_model.named_parameters())
    summed, norms = dp.clipped_sum(lambda i: ((ours_model(x[i:i + 1]) - y[i:i + 1]) ** 2).sum(), list(range(8)),
                                   params, max_norm=c)
    assert max(norms) > c  # some examples are clipped, some maybe not

    opacus_model = GradSampleModule(copy.deepcopy(layer))
    opt = DPOptimizer(torch.optim.SGD(opacus_model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=c,
                      expected_batch_size=8)
    ((opacus_model(x) - y) ** 2).sum().backward()
    opt.pre_step()  # clip per sample, sum, add (zero) noise, scale by 1/expected batch size
    for name, p in opacus_model._module.named_parameters():
        assert torch.allclose(summed[name] / 8, p.grad, atol=1e-6), name


def test_the_accountant_agrees_with_googles_and_the_noise_reaches_the_target():
    import dp_accounting
    from dp_accounting import rdp

    q, steps, delta = 32 / 300, 40, 1e-5
    for target in (8.0, 2.0):
        sigma = dp.noise_multiplier(target, delta, q, steps, "rdp")
        spent = dp.spent_epsilon(sigma, q, steps, delta, "rdp")
        assert spent <= target + 0.02 and spent > target * 0.95
        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        assert acc.get_epsilon(delta) == pytest.approx(spent, rel=0.05)
    assert dp.noise_multiplier(2.0, delta, q, steps, "rdp") > dp.noise_multiplier(8.0, delta, q, steps, "rdp")


def test_public_text_is_mixed_in_unclipped_and_outside_the_private_batch():
    torch.manual_seed(1)
    layer = torch.nn.Linear(4, 2)
    params = dict(layer.named_parameters())
    x = torch.randn(5, 4)
    public_x = 100 * torch.randn(3, 4)  # a public gradient far larger than the clipping norm
    loss_of = lambda i: layer(x[i:i + 1]).pow(2).sum()  # noqa: E731
    public_loss = lambda: layer(public_x).pow(2).sum()  # noqa: E731
    kw = dict(sigma=0.0, max_norm=0.1, expected=2.5, secret=b"k", step=0)
    private = dp.step_gradient(loss_of, [0, 2, 4], params, {}, **kw)
    mixed = dp.step_gradient(loss_of, [0, 2, 4], params, {}, public_loss=public_loss, public_weight=0.25, **kw)
    public_loss().backward()
    for n, p in params.items():
        assert torch.allclose(mixed[n], 0.75 * private[n] + 0.25 * p.grad)
        assert float(p.grad.norm()) > 10 * 0.1  # the public part was not clipped
    # the private part is bounded by C / expected per example, whatever the public text
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in private.values())))
    assert norm <= 3 * 0.1 / 2.5 + 1e-6
    # the sampling rate and the batches count the owner's documents only
    assert dp.sample_rate(300, 32) == pytest.approx(32 / 300)
    batch = dp.poisson_batch(300, 32 / 300, b"secret", 3)
    assert batch == dp.poisson_batch(300, 32 / 300, b"secret", 3) and all(0 <= i < 300 for i in batch)
    assert batch != dp.poisson_batch(300, 32 / 300, b"other secret", 3)


def test_noise_is_keyed_by_the_secret_masked_and_scaled():
    t = {"w": torch.zeros(2, 4000)}
    mask = torch.ones(2, 4000)
    mask[0] = 0
    dp.add_noise(t, sigma=2.0, max_norm=0.5, masks={"w": mask}, secret=b"s", step=1)
    assert torch.equal(t["w"][0], torch.zeros(4000))  # the frozen slice gets no noise
    assert float(t["w"][1].std()) == pytest.approx(1.0, rel=0.05)  # σ·C
    again = {"w": torch.zeros(2, 4000)}
    dp.add_noise(again, sigma=2.0, max_norm=0.5, masks={"w": mask}, secret=b"s", step=1)
    assert torch.equal(t["w"], again["w"])


def test_refusals_are_one_line():
    with pytest.raises(FlexoError, match=r"delta 0.01 is not below 1/150") as e:
        dp.check_delta(0.01, 150, "news")
    assert "\n" not in str(e.value)
    with pytest.raises(FlexoError, match="cannot be reached") as e:
        dp.noise_multiplier(1e-4, 1e-5, 0.9, 10_000, "rdp")
    assert "\n" not in str(e.value)
