"""`flexo <stage> …`: the command line. Every stage module declares its own subcommand (`add_cli`) and
calls its one stage function; dvc.yaml and the Prefect flows run the same subcommands.

    flexo curate --owner public      flexo tokenizer          flexo train-public
    flexo embed --owner code         flexo train-expert --owner code
    flexo router-update --owner code flexo merge              flexo router-tune
    flexo audit-extraction --owner code                       flexo score --owner code
    flexo evaluate                   flexo benchmark          flexo tasks --out DIR
    flexo opt-out --model models/merged --exclude news --out DIR
    flexo attribute --model models/merged --text "…"          flexo status
    flexo serve --model models/merged-rt --port 8000
    flexo --params configs/olmo2-7b.yaml plan --gpus 8 --gpu-mem 80     (memory, disk, time per stage; no run)
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

STARTED = time.time()  # this process's start (before the stage's heavy imports), for .cache/timings.jsonl

# Offline and quiet by default: nothing is fetched from a model or dataset hub at run time.
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1", "DS_ACCELERATOR": "cpu",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

from flexo import timings  # noqa: E402
from flexo.errors import FlexoError  # noqa: E402
from flexo.fsutil import NO_SPACE  # noqa: E402
from flexo.threads import torch_threads  # noqa: E402

# Every subcommand and the stage module that declares it (arguments next to its function), in pipeline order.
COMMANDS = {"curate": "curate", "tokenizer": "tokenizer", "embed": "embed", "train-public": "train_public",
            "train-expert": "train_expert", "router-update": "router_update", "merge": "merge",
            "router-tune": "router_tune", "audit-extraction": "audit", "score": "score", "evaluate": "evaluate",
            "benchmark": "benchmark", "tasks": "tasks",
            "opt-out": "optout", "attribute": "attribute", "status": "status", "serve": "serve", "plan": "plan"}
STAGES = tuple(dict.fromkeys(COMMANDS.values()))
_GLOBAL_VALUES = ("--root", "--params")  # the options before the subcommand that take a value


def build_parser(modules: tuple[str, ...] = STAGES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="project root holding params.yaml (default: .)")
    parser.add_argument("--params", default=None, help="params file (default: ROOT/params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name in modules:
        importlib.import_module(f"stages.{name}").add_cli(sub)
    return parser


def command_module(argv: list[str]) -> str | None:
    """The stage module of the subcommand in `argv`, or None (no subcommand, --help, a typo): only that
    module is imported, so `flexo merge` or `flexo status` never pays for torch's import."""
    it = iter(argv)
    for arg in it:
        if arg in _GLOBAL_VALUES:
            next(it, None)
        elif not arg.startswith("-"):
            return COMMANDS.get(arg)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    module = command_module(argv)
    args = build_parser((module,) if module else STAGES).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "lm_eval", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        # A stage leaves torch's thread count as it found it (see flexo/threads.py).
        with torch_threads():
            result = args.run(args)
    except FlexoError as e:
        print(f"flexo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # The disk, permissions or the file system, not flexo: one line naming the path (the stage's temp
        # output was already removed by atomic_dir/atomic_path on the way out).
        print(f"flexo: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexo: interrupted", file=sys.stderr)
        return 130
    # Where a `make demo` spends its time, whole process and imports included (bench/run.py reads it).
    stage = args.command + (f"@{args.owner}" if getattr(args, "owner", None) else "")
    timings.record(args.root, f"process:{stage}", wall_s=round(time.time() - STARTED, 2))
    if result is not None:
        print(json.dumps(result, indent=2, default=str) if not isinstance(result, str) else result)
    return 0


def os_error_message(e: OSError) -> str:
    where = f" writing {e.filename}" if e.filename else ""
    if e.errno in NO_SPACE:
        return f"no space left{where} ({e.strerror}): free disk space (or raise the file-size limit) and rerun"
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where}: check the path and its permissions, then rerun"


if __name__ == "__main__":
    sys.exit(main())
