"""`flexo serve`: the merged model behind an OpenAI-compatible HTTP endpoint and a playground page.

    flexo serve --model models/merged-rt                    # http://127.0.0.1:8000 (playground at /)
    flexo serve --model models/merged --host 0.0.0.0 --port 8080 --max-tokens-limit 128
    flexo serve --model models/merged --engine vllm         # a GPU with vLLM: no per-request opt-out

Every request may exclude owners (`"exclude": ["news"]`) and ask which owners' experts served it
(`"attribution": true` or `"tokens"`): see :mod:`flexo.openai_server`. Not a pipeline stage: it reads a
model folder only, never an owner's data.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from flexo.errors import FlexoError
from flexo.model_files import read_meta


def serve(model_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, max_tokens_limit: int = 256,
          max_prompt_tokens: int | None = None, engine: str = "flexo") -> None:
    """Load `model_dir` and serve it until interrupted."""
    from flexo.openai_server import create_app, load_engine, serving_in_thread

    if not (Path(model_dir) / "config.json").is_file():
        raise FlexoError(f"--model {model_dir} is not a model folder (no config.json): pass e.g. models/merged-rt")
    read_meta(Path(model_dir))  # a folder flexo did not write is refused here, in one line
    if not 1 <= max_tokens_limit <= 4096:
        raise FlexoError(f"--max-tokens-limit must be between 1 and 4096, got {max_tokens_limit}")
    if not 0 <= port <= 65535:
        raise FlexoError(f"--port must be between 0 and 65535, got {port}")
    _check_address(host, port)
    # The model runs on this (main) thread and HTTP on another: see Engine.run_jobs for why.
    served = load_engine(model_dir, max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                         engine=engine, worker=False)
    with serving_in_thread(create_app(served), host, port) as url:
        print(f"flexo: serving {model_dir} with the {engine} engine (experts {', '.join(served.server.experts)}) "
              f"at {url} — playground at /, API at /v1; Ctrl+C stops", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, _stop)  # `kill`, systemd, a container's stop: the same as Ctrl+C
        try:
            served.run_jobs()
        except KeyboardInterrupt:
            print("flexo: stopped", file=sys.stderr)


def _stop(signum, frame):
    raise KeyboardInterrupt


def _check_address(host: str, port: int) -> None:
    """Refuse a taken port or a foreign address before the model loads (one line, not uvicorn's log)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FlexoError(f"--host {host} is not an address ({e.strerror}): pass e.g. 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise FlexoError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from None


def _run(args):
    serve(args.model, host=args.host, port=args.port, max_tokens_limit=args.max_tokens_limit,
          max_prompt_tokens=args.max_prompt_tokens, engine=args.engine)


def add_cli(subparsers) -> None:
    """`flexo serve --model DIR [--host H] [--port P] [--max-tokens-limit N] [--max-prompt-tokens N]`."""
    text = "serve a model over HTTP (OpenAI-compatible /v1/completions, per-request opt-out, attribution, playground)"
    p = subparsers.add_parser("serve", help=text, description=text)
    p.add_argument("--model", type=Path, required=True, help="a flexo model folder (e.g. models/merged-rt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-tokens-limit", type=int, default=256, help="the most new tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="the longest prompt in tokens (default: the model's positions)")
    p.add_argument("--engine", choices=("flexo", "vllm"), default="flexo",
                   help="flexo (default): per-request opt-out and attribution; vllm: the stock model through vLLM "
                        "on a GPU, no opt-out or attribution")
    p.set_defaults(run=_run)
