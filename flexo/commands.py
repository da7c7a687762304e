"""Subcommands of the later stages, each added by its stage module's `add_cli(subparsers)`.

Kept apart from cli.py so that each stage's arguments sit next to the function they call.
"""

from __future__ import annotations

from flexo.cli import register


@register
def _merge(sub):
    from stages.merge import add_cli

    add_cli(sub)


@register
def _opt_out(sub):
    from stages.optout import add_cli

    add_cli(sub)


@register
def _router_update(sub):
    from stages.router_update import add_cli

    add_cli(sub)


@register
def _router_tune(sub):
    from stages.router_tune import add_cli

    add_cli(sub)


@register
def _evaluate(sub):
    from stages.evaluate import add_cli

    add_cli(sub)


@register
def _audit(sub):
    from stages.audit import add_cli

    add_cli(sub)


@register
def _attribute(sub):
    from stages.attribute import add_cli

    add_cli(sub)


@register
def _status(sub):
    from stages.status import add_cli

    add_cli(sub)
