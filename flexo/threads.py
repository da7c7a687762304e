"""How many threads torch computes on, and keeping that count from leaking from one stage to the next.

A float result is only the same bytes from run to run on the same number of threads (a BLAS splits its
sums by thread). A stage run as its own process (DVC, the flows, the CLI) starts from the same count every
time; stages run one after another in one process (the tests, a notebook) must each leave the count as
they found it, or a later stage computes on a different count and writes different bytes (caught by
tests/test_determinism.py when router-tune left one thread behind and the next train-expert differed)."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def torch_threads(n: int | None = None) -> Iterator[None]:
    """Run a block on `n` torch intra-op threads (None: leave the count alone) and restore the count it
    had before. Imports torch only when it is asked to set a count, so light commands stay light."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    if n is not None:
        import torch

        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before is not None:
            sys.modules["torch"].set_num_threads(before)
