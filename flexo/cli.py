"""`flexo <stage> …`: the command line. Each subcommand calls one plain function of a stage module;
dvc.yaml and the Prefect flows call the same subcommands/functions.

    flexo curate --owner public      flexo tokenizer          flexo train-public
    flexo embed --owner code         flexo train-expert --owner code
    flexo merge                      flexo opt-out --model models/merged --exclude news --out DIR
    flexo router-tune                flexo evaluate           flexo status
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

STARTED = time.time()  # this process's start (before the stage's heavy imports), for .cache/timings.jsonl

# Offline and quiet by default: nothing is fetched from a model or dataset hub at run time.
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1", "DS_ACCELERATOR": "cpu",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

from flexo.errors import FlexoError  # noqa: E402


def _ctx(args):
    from flexo.layout import Layout
    from flexo.params import load_params

    layout = Layout.at(args.root)
    return load_params(args.params or layout.params), layout


def cmd_curate(args):
    params, layout = _ctx(args)
    from stages.curate import curate

    counter = None
    if args.owner != "public" and (layout.tokenizer / "tokenizer.json").is_file():
        from stages.tokenizer import count_tokens, load_tokenizer

        tok = load_tokenizer(layout)
        counter = lambda texts: count_tokens(tok, texts)  # noqa: E731
    return curate(args.owner, params, layout, token_counter=counter)


def cmd_tokenizer(args):
    params, layout = _ctx(args)
    from stages.tokenizer import train_tokenizer

    return train_tokenizer(params, layout)


def cmd_train_public(args):
    params, layout = _ctx(args)
    from stages.train_public import train_public

    return train_public(params, layout, resume=not args.no_resume)


def cmd_embed(args):
    params, layout = _ctx(args)
    from stages.embed import embed

    return embed(args.owner, params, layout)


def cmd_train_expert(args):
    params, layout = _ctx(args)
    from stages.train_expert import train_expert

    return train_expert(args.owner, params, layout, resume=not args.no_resume)


COMMANDS = {}


def _add(sub, name, fn, help_text):
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(fn=fn)
    COMMANDS[name] = p
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="project root holding params.yaml (default: .)")
    parser.add_argument("--params", default=None, help="params file (default: ROOT/params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    p = _add(sub, "curate", cmd_curate, "curate one owner's (or the public) text into train/val/test splits")
    p.add_argument("--owner", required=True, help="an owner from params.yaml, or `public`")
    _add(sub, "tokenizer", cmd_tokenizer, "train the shared BPE tokenizer on the public train split")
    p = _add(sub, "train-public", cmd_train_public, "train (or convert) the public model")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint left by an interrupted run")
    p = _add(sub, "embed", cmd_embed, "compute one owner's (or the public) domain router embedding")
    p.add_argument("--owner", required=True, help="an owner from params.yaml, or `public`")
    p = _add(sub, "train-expert", cmd_train_expert, "train one owner's expert coupled to the frozen public model")
    p.add_argument("--owner", required=True, help="an owner from params.yaml")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint left by an interrupted run")
    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return parser


_EXTRA_COMMANDS: list = []


def register(fn):
    """Let later stage modules add their subcommands without this file growing a branch per stage."""
    _EXTRA_COMMANDS.append(fn)
    return fn


def main(argv: list[str] | None = None) -> int:
    from flexo import commands  # noqa: F401  (registers merge, opt-out, evaluate, …)

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "lm_eval", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = args.fn(args)
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
    _record_timing(args)
    if result is not None and not getattr(args, "quiet", False):
        print(json.dumps(result, indent=2, default=str) if not isinstance(result, str) else result)
    return 0


def os_error_message(e: OSError) -> str:
    from flexo.fsutil import NO_SPACE

    where = f" writing {e.filename}" if e.filename else ""
    if e.errno in NO_SPACE:
        return f"no space left{where} ({e.strerror}): free disk space (or raise the file-size limit) and rerun"
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where}: check the path and its permissions, then rerun"


def _record_timing(args) -> None:
    """One line per successful command in ROOT/.cache/timings.jsonl: where a `make demo` spends its time
    (whole process, imports included), read by bench/report.py. Best effort: never fails the command."""
    stage = args.command + (f"@{args.owner}" if getattr(args, "owner", None) else "")
    line = {"stage": stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
            "wall_s": round(time.time() - STARTED, 2)}
    try:
        path = Path(args.root) / ".cache" / "timings.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError:
        pass


if __name__ == "__main__":
    # `python -m flexo.cli`: run the imported module's main, where flexo.commands registers the stages.
    from flexo.cli import main as _main

    sys.exit(_main())
