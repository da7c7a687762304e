"""`flexo serve --engine vllm`: the stock merged model served through vLLM (GPU only).

vLLM loads a flexo model folder as it is (a stock `FlexOlmoForCausalLM`), but it has no per-request expert
masking and does not expose the routers' outputs, so this engine refuses a request that excludes owners
or asks for attribution, saying why (serve an opted-out folder, `flexo opt-out`, or use the default
engine). `VllmServer` has the interface `flexo.openai_server.Engine` uses (`complete`, `experts`,
`tokenizer`, `positions`, `top_k`, `meta`), so the HTTP side, its validation and its errors are shared.

Not run in this repository's CI (no GPU, no vLLM): `bench/gpu.sh` exercises it where a GPU machine has
vLLM installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

from flexo.errors import FlexoError
from flexo.model_files import read_meta

WHY = "vLLM has no per-request expert masking"


def vllm_available() -> str | None:
    """None when vLLM and a CUDA GPU are present, else the reason they are not."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (pip install vllm, on a machine with a CUDA GPU)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


class VllmServer:
    """A model folder loaded by vLLM, with `FlexoServer.complete`'s events (all at once, per prompt)."""

    supports_opt_out = False

    def __init__(self, model_dir: Path | str, **llm_args):
        reason = vllm_available()
        if reason:
            raise FlexoError(f"--engine vllm cannot run here: {reason}; serve with the default engine (flexo)")
        from transformers import AutoTokenizer
        from vllm import LLM

        self.model_dir = Path(model_dir)
        self.meta = read_meta(self.model_dir)
        self.experts = list(self.meta.get("experts") or [])
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.llm = LLM(model=str(self.model_dir), tokenizer=str(self.model_dir), **llm_args)
        config = self.llm.llm_engine.model_config.hf_config
        self.positions = int(config.max_position_embeddings)
        self.top_k = int(config.num_experts_per_tok)

    def complete(self, ids: Sequence[int], *, exclude: Sequence[str] = (), max_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), logprobs: int | None = None, echo: bool = False,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[dict]:
        from vllm import SamplingParams

        if exclude:
            raise FlexoError(f"exclude: {WHY}; serve an opted-out folder (flexo opt-out) or use --engine flexo")
        params = SamplingParams(max_tokens=max(max_tokens, 1), temperature=temperature, top_p=top_p, seed=seed,
                                stop=list(stop) or None, logprobs=logprobs,
                                prompt_logprobs=(logprobs or 0) if echo else None)
        out = self.llm.generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=False)[0]
        if echo:
            rows = out.prompt_logprobs or [None] * len(ids)
            yield {"type": "prompt", "ids": list(ids), "pieces": [self.tokenizer.decode([i]) for i in ids],
                   "logprobs": [None if r is None else r[t].logprob for r, t in zip(rows, ids)],
                   "top": [None if r is None else _top(r, logprobs) for r in rows] if logprobs is not None else None}
        gen = out.outputs[0]
        tokens = list(gen.token_ids)[:max_tokens] if max_tokens else []
        sent = ""
        for k, tok in enumerate(tokens):
            row = gen.logprobs[k] if gen.logprobs else None
            full = self.tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)
            piece = full[len(self.tokenizer.decode(tokens[:k], skip_special_tokens=True)):]
            text = gen.text[len(sent):len(full)] if k < len(tokens) - 1 else gen.text[len(sent):]
            sent += text
            yield {"type": "token", "id": tok, "piece": piece, "text": text,
                   "logprob": row[tok].logprob if row else None,
                   "top": _top(row, logprobs) if row and logprobs is not None else None, "routing": None}
        yield {"type": "done", "finish_reason": gen.finish_reason or "length", "text": gen.text, "attribution": None,
               "prompt_tokens": len(ids), "completion_tokens": len(tokens)}


def _top(row: dict, k: int | None) -> dict[str, float]:
    best = sorted(row.values(), key=lambda lp: -lp.logprob)[: max(int(k or 0), 1)]
    return {lp.decoded_token or "": float(lp.logprob) for lp in best}
