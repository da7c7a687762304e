"""Differentially private expert training: DP-SGD with one document as the privacy unit.

An owner that sets `train_expert.dp.epsilon` trains its expert (expert 1's FFN and its router row, every
layer) by DP-SGD (Abadi et al. 2016), so that the published expert is (ε, δ)-DP with respect to adding or
removing any one of the owner's training documents:

- **Examples are documents.** Each train document becomes one example: its first
  `blocks_per_document` blocks of `max_seq_len` tokens (EOS-terminated, the last block padded and the
  padding left out of the loss). Its loss is the mean over its tokens.
- **Poisson sampling.** At every step each document joins the batch independently with probability
  q = documents_per_step / documents (what the accountant assumes), from a generator keyed by the
  owner's secret.
- **Per-document clipping.** Each sampled document's gradient is computed by its own backward pass
  (exact, whatever the layer: the fused expert tensors need no per-sample hooks) and scaled to norm at
  most C = `max_grad_norm`; the clipped gradients are summed.
- **Gaussian noise** N(0, σ²C²) per trainable coordinate is added to the sum, which is divided by the
  expected batch size qN (Opacus's convention). σ is the smallest noise multiplier Opacus's accountant
  (`opacus.accountants`, RDP by default) says reaches the target ε at δ for the planned steps; the ε
  actually spent is recorded. Noise comes from a generator keyed by the owner's secret
  (`.cache/dp-secret`), so nobody without it can subtract the noise, and a rerun on the owner's machine
  gives the same bytes.
- **Public text is not private.** `public_mix` blocks are public data: their gradient is computed
  separately, unclipped and without noise, and mixed in as (1 − w)·private + w·public with
  w = `public_mix`. They are not in the Poisson batches and do not count in q or in the accounting; the
  mix depends only on public data and the step, so it is post-processing of the DP release.
- **Frozen parts stay bit-identical.** The noise is masked like the gradients (expert 0 and r_pub get
  exactly zero), AdamW has weight decay 0 on those tensors, and the stage checks every public tensor.

What the guarantee covers: the expert package. The owner's other releases are separate mechanisms — the
router statistics (`router_tune.dp_epsilon`, their own ε: the total is the sum), and the numbers its own
audit and scoring stages publish. Under DP the router row starts from r_pub (data-independent) instead of
the owner's domain embedding or classifier, which read the owner's text outside DP-SGD.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass

import torch

from flexo.errors import FlexoError

log = logging.getLogger(__name__)

MECHANISM = ("DP-SGD: per-document gradient clipping, Gaussian noise, Poisson sampling of documents "
             "(add/remove one document); public_mix blocks outside the private batches")


# ------------------------------------------------------------------------------------------ accounting
def steps_for(epochs: float, documents: int, documents_per_step: int, max_steps: int = 0) -> int:
    """Optimizer steps for `epochs` expected passes over the documents at the expected batch size."""
    steps = max(1, math.ceil(epochs * documents / documents_per_step))
    return min(steps, max_steps) if max_steps else steps


def sample_rate(documents: int, documents_per_step: int) -> float:
    return min(1.0, documents_per_step / documents)


def check_delta(delta: float, documents: int, owner: str) -> None:
    if not 0 < delta < 1 / documents:
        raise FlexoError(f"train_expert.dp.delta {delta:g} is not below 1/{documents} (the owner {owner!r} has "
                         f"{documents} training documents): a δ that large allows leaking a whole document; "
                         f"set it below {1 / documents:.2g} (e.g. {_round_down(0.1 / documents):g})")


def _round_down(x: float) -> float:
    exponent = math.floor(math.log10(x))
    return math.floor(x / 10**exponent) * 10**exponent


def noise_multiplier(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """The noise multiplier σ that reaches (ε, δ) after `steps` Poisson-sampled steps at rate q."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is looser, still valid
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                              accountant=accountant, epsilon_tolerance=0.01))
    except ValueError as e:
        raise FlexoError(f"train_expert.dp.epsilon {epsilon:g} cannot be reached with {steps} steps at sampling "
                         f"rate {q:.3g} and δ {delta:g} ({e}): raise epsilon, or lower documents_per_step or epochs"
                         ) from None


def spent_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    """ε after `steps` steps with noise multiplier σ at rate q (Opacus's accountant)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta))


# ------------------------------------------------------------------------------------------ examples
@dataclass
class DocumentExamples:
    """One example per document: `blocks[i]` is [k_i, seq] token ids, `labels[i]` the same with padding -100."""

    blocks: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def tokens(self) -> int:
        return int(sum(int((lab != -100).sum()) for lab in self.labels))


def document_examples(tokenizer, texts: list[str], seq_len: int, blocks_per_document: int) -> DocumentExamples:
    """Each document's first `blocks_per_document` blocks (EOS-terminated; the last block padded with EOS
    that the loss ignores)."""
    eos = tokenizer.eos_token_id
    blocks, labels = [], []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = (list(ids) + [eos])[: seq_len * blocks_per_document]
        if len(ids) < 2:
            continue
        k = math.ceil(len(ids) / seq_len)
        x = torch.full((k * seq_len,), eos, dtype=torch.long)
        x[: len(ids)] = torch.tensor(ids)
        y = torch.full((k * seq_len,), -100, dtype=torch.long)
        y[: len(ids)] = x[: len(ids)]
        blocks.append(x.view(k, seq_len))
        labels.append(y.view(k, seq_len))
    if not blocks:
        raise FlexoError("DP training has no document of at least 2 tokens: add documents")
    return DocumentExamples(blocks, labels)


# ------------------------------------------------------------------------------------------ randomness
def keyed_generator(secret: bytes, what: str) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(secret + what.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


def poisson_batch(n: int, q: float, secret: bytes, step: int) -> list[int]:
    """The documents in step `step`'s batch: each with probability q, independently (may be empty)."""
    g = keyed_generator(secret, f"dp-sgd/sample/{step}")
    return torch.nonzero(torch.rand(n, generator=g) < q).flatten().tolist()


# ------------------------------------------------------------------------------------------ gradients
def example_loss(model, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    with autocast():
        return model(input_ids=x, labels=y).loss


def clipped_sum(loss_of, index: list[int], params: dict[str, torch.nn.Parameter],
                max_norm: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Σ_i clip(g_i, C) over the examples in `index`, g_i the gradient of `loss_of(i)` from its own backward
    pass (so it is that example's gradient and nothing else's; gradient hooks — the frozen-slice masks —
    apply as in ordinary training), and each g_i's norm before clipping."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in index:
        for p in params.values():
            p.grad = None
        loss = loss_of(i)
        if not torch.isfinite(loss.detach()):
            raise FlexoError(f"DP training: a document's loss became {float(loss)}: lower the lr")
        loss.backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
        norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values())))
        scale = min(1.0, max_norm / (norm + 1e-12))
        for n, g in grads.items():
            total[n].add_(g, alpha=scale)
        norms.append(norm)
    for p in params.values():
        p.grad = None
    return total, norms


def step_gradient(loss_of, index: list[int], params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor],
                  *, sigma: float, max_norm: float, expected: float, secret: bytes, step: int,
                  public_loss=None, public_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """One DP-SGD step's gradient: (Σ clipped + noise) / expected batch size, mixed with the unclipped,
    un-noised gradient of the public loss as (1 − w)·private + w·public (public data is not private)."""
    summed, _ = clipped_sum(loss_of, index, params, max_norm)
    add_noise(summed, sigma, max_norm, masks, secret, step)
    private = {n: t / expected for n, t in summed.items()}
    if public_loss is None or public_weight == 0:
        return private
    public_loss().backward()  # the masks apply
    out = {}
    for n, p in params.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[n] = (1 - public_weight) * private[n] + public_weight * g
        p.grad = None
    return out


def add_noise(total: dict[str, torch.Tensor], sigma: float, max_norm: float, masks: dict[str, torch.Tensor],
              secret: bytes, step: int) -> None:
    """Gaussian noise N(0, (σC)²) on every trainable coordinate (masked like the gradients)."""
    g = keyed_generator(secret, f"dp-sgd/noise/{step}")
    for n, t in total.items():
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * (sigma * max_norm)
        if n in masks:
            noise = noise * masks[n]
        t.add_(noise)


# ------------------------------------------------------------------------------------------ the loop
@dataclass
class DPRecord:
    """What goes into expert.json's `dp`: the guarantee as spent, and how it was obtained."""

    epsilon: float  # spent, by the accountant, after every step
    delta: float
    target_epsilon: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    documents: int
    blocks_per_document: int
    accountant: str
    mechanism: str = MECHANISM

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["epsilon"] = round(d["epsilon"], 4)
        d["noise_multiplier"] = round(d["noise_multiplier"], 6)
        d["sample_rate"] = round(d["sample_rate"], 6)
        return d


def train_dp(model, examples: DocumentExamples, public_blocks: torch.Tensor | None, val_blocks: torch.Tensor, tp, dp,
             *, trainable: dict[str, torch.nn.Parameter], grad_masks: dict[str, torch.Tensor], ckpt_dir, key_parts: dict,
             secret: bytes, resume: bool = True, desc: str = "train-expert (DP)", on_step=None):
    """DP-SGD on `trainable` (module doc). Returns (TrainResult, DPRecord). Resumable like
    `flexo.training.train`: sampling and noise are keyed by (secret, step), so a resumed run draws what
    the uninterrupted one would have. The loss log records no training loss (it would be a non-private
    release about the sampled documents); the validation loss is on the owner's validation documents."""
    import time

    from tqdm import tqdm

    from flexo.training import (
        Batches, begin_run, finish_run, lr_at, param_groups, run_key, save_checkpoint, set_threads, val_loss,
    )

    set_threads()
    torch.manual_seed(tp.seed)
    for name, mask in grad_masks.items():
        trainable[name].register_hook(lambda g, m=mask: g * m)
    groups, named = param_groups(trainable, grad_masks, set(), tp)
    opt = torch.optim.AdamW(groups, lr=tp.lr, betas=(0.9, 0.95), eps=1e-8)

    n = len(examples)
    q = sample_rate(n, dp.documents_per_step)
    total = steps_for(dp.epochs, n, dp.documents_per_step, tp.max_steps)
    sigma = noise_multiplier(dp.epsilon, dp.delta, q, total, dp.accountant)
    log.info("%s: %d documents, q=%.4f, %d steps, noise multiplier %.4f for ε=%g, δ=%g", desc, n, q, total, sigma,
             dp.epsilon, dp.delta)
    w = tp.public_mix if public_blocks is not None else 0.0
    public = Batches(public_blocks, max(1, round(dp.documents_per_step * w)), tp.seed) if w else None
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=tp.bf16)  # noqa: E731 (as train's)

    key = run_key({**key_parts, "train": {k: getattr(tp, k) for k in vars(tp) if k != "dp"}, "dp": vars(dp),
                   "total": total, "sigma": sigma})
    start, history, initial_val = begin_run(ckpt_dir, key, named, opt, resume=resume, desc=desc,
                                            initial_val=lambda: val_loss(model, val_blocks, tp))
    model.train()
    expected = q * n
    block_tokens = sum(b.numel() for b in examples.blocks)  # every document's blocks, padding included
    started, tokens_run, aside_s = time.time(), 0, 0.0
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", mininterval=2.0)
    for step in range(start, total):
        lr = lr_at(step, total, tp)
        for g in opt.param_groups:
            g["lr"] = lr
        index = poisson_batch(n, q, secret, step)
        x = public.batch(step) if public is not None else None
        grads = step_gradient(lambda i: example_loss(model, examples.blocks[i], examples.labels[i], autocast), index,
                              named, grad_masks, sigma=sigma, max_norm=dp.max_grad_norm, expected=expected,
                              secret=secret, step=step, public_weight=w,
                              public_loss=(lambda: example_loss(model, x, x, autocast)) if x is not None else None)
        for name, p in named.items():
            p.grad = grads[name]
        tokens_run += x.numel() if x is not None else 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_run += sum(int((examples.labels[i] != -100).sum()) for i in index)  # the documents' own tokens
        bar.update()
        done = step + 1
        if done % tp.eval_every == 0 or done == total:
            t_aside = time.time()
            history.append({"step": done, "tokens": round(done * q * block_tokens), "lr": lr, "train_loss": float("nan"),
                            "val_loss": val_loss(model, val_blocks, tp)})
            aside_s += time.time() - t_aside
        if done % tp.checkpoint_every == 0 and done < total:
            t_aside = time.time()
            save_checkpoint(ckpt_dir, key, done, named, opt, history)
            aside_s += time.time() - t_aside
        if on_step:
            on_step(done)
    bar.close()
    # tokens: the expected number (the actual one depends on the secret sampling)
    result = finish_run(history, steps=total, tokens=round(total * q * block_tokens), initial_val=initial_val,
                        wall=time.time() - started, tokens_run=tokens_run, start=start, aside_s=aside_s)
    record = DPRecord(epsilon=spent_epsilon(sigma, q, total, dp.delta, dp.accountant), delta=dp.delta,
                      target_epsilon=dp.epsilon, noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm,
                      sample_rate=q, steps=total, documents=n, blocks_per_document=dp.blocks_per_document,
                      accountant=dp.accountant)
    return result, record
