"""The project a command works in: its root folder, its parameters and where every artifact lives.

    project = Project.open(".")            # ROOT/params.yaml
    project = Project.open(root, "other.yaml")
    merge(project.params, project.layout)

The CLI, the Prefect flows and the tests open a project the same way; stage functions take
`(params, layout)` so that a caller can hand them parameters edited in memory.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flexo.layout import Layout
from flexo.params import Params, load_params


@dataclass(frozen=True)
class Project:
    layout: Layout
    params: Params
    params_file: Path

    @classmethod
    def open(cls, root: Path | str = ".", params_file: Path | str | None = None) -> "Project":
        """The project at `root`, with `params_file` (default ROOT/params.yaml) loaded and checked."""
        layout = Layout.at(root)
        path = Path(params_file) if params_file else layout.params
        return cls(layout, load_params(path), path)

    @classmethod
    def from_args(cls, args) -> "Project":
        """The project named by the CLI's global options `--root` and `--params`."""
        return cls.open(args.root, args.params)

    @property
    def root(self) -> Path:
        return self.layout.root


def stage_command(subparsers, name: str, help_text: str, call: Callable[[argparse.Namespace, Project], Any], *,
                  owner: str | None = None) -> argparse.ArgumentParser:
    """Add `flexo NAME` whose run opens the project (`--root`, `--params`) and returns `call(args, project)`;
    `owner` (its help text) adds the `--owner` argument every per-owner stage takes."""
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    if owner is not None:
        p.add_argument("--owner", required=True, help=owner)
    p.set_defaults(run=lambda args: call(args, Project.from_args(args)))
    return p
