"""Subcommands of the later stages (merge, opt-out, router tuning, evaluation, status).

Kept apart from cli.py so that each stage's arguments sit next to each other in one readable list.
"""

from __future__ import annotations
