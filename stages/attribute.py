"""Stage `attribute`: which owners' experts a text is routed to.

    flexo attribute --model models/merged --text "def f(x): return x"
    flexo attribute --model models/merged --file doc.txt --exclude news --json

prints each expert's share of the routing of the text (mean router probability, applied top-k gate
share, top-1 share; overall and per layer: see :mod:`flexo.attribution`), with the experts named in
`--exclude` masked at run time exactly as `FlexoServer` serves a request that opts them out (they get 0).
Works on any flexo model folder (public, an owner's model, merged, an opted-out copy). The evaluation's
routing analysis over every domain is :mod:`flexo.routing_report`.
"""

from __future__ import annotations

from pathlib import Path

from flexo.attribution import attribute_request
from flexo.errors import FlexoError
from flexo.routers import check_exclusions
from flexo.routing_report import load_routed_model, model_experts


def _read_text(args) -> str:
    if args.text is not None:
        text = args.text
    else:
        path = Path(args.file)
        if path.is_dir():
            raise FlexoError(f"--file {path} is a folder, not a file: pass a UTF-8 text file")
        if path.exists() and not path.is_file():
            raise FlexoError(f"--file {path} is not a regular file (a device or a pipe): pass a UTF-8 text file")
        if not path.is_file():
            raise FlexoError(f"--file {path} does not exist: pass a UTF-8 text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FlexoError(f"--file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise FlexoError("nothing to attribute: the text is empty")
    return text


def attribute_cli(model_dir: Path, text: str, exclude: list[str] = ()) -> dict:
    """What `flexo attribute` computes, as a dict (Attribution.to_dict plus the model folder)."""
    experts = model_experts(model_dir)  # cheap checks before loading weights
    names = check_exclusions(experts, list(exclude), str(model_dir))
    model, tokenizer, experts = load_routed_model(model_dir)
    a = attribute_request(model, tokenizer, text, experts, names)
    return {"model": str(model_dir), **a.to_dict(), "_render": a.render()}


def _run(args):
    text = _read_text(args)
    result = attribute_cli(Path(args.model), text, args.exclude or [])
    rendered = result.pop("_render")
    if args.json:
        return result
    return f"model: {result['model']}\n{rendered}"


def add_cli(subparsers) -> None:
    """`flexo attribute --model DIR (--text TEXT | --file FILE) [--json] [--exclude NAME ...]`."""
    text = "show which owners' experts a text is routed to (shares of routing weight, overall and per layer)"
    p = subparsers.add_parser("attribute", help=text, description=text)
    p.add_argument("--model", type=Path, required=True, help="a flexo model folder (e.g. models/merged)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", default=None, help="the text to attribute")
    src.add_argument("--file", type=Path, default=None, help="a UTF-8 text file to attribute")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--exclude", nargs="+", action="extend", default=None, metavar="NAME",
                   help="owners masked at run time for this request (as the server's per-request opt-out)")
    p.set_defaults(run=_run)
