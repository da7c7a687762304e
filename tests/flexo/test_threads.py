"""A stage leaves torch's thread count as it found it, so stages run one after another in one process
compute on the same count as when each runs alone (flexo/threads.py)."""

from __future__ import annotations

import torch

from flexo.threads import torch_threads


def test_the_count_is_set_inside_and_restored_after_even_on_error():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    try:
        with torch_threads(1):
            raise ValueError("boom")
    except ValueError:
        pass
    assert torch.get_num_threads() == before


def test_a_cli_stage_that_changes_the_count_leaves_it_as_found(monkeypatch, tmp_path):
    from flexo import cli

    before = torch.get_num_threads()

    def greedy(args):
        torch.set_num_threads(before + 1)  # what a stage calling set_threads() on a bigger machine does

    monkeypatch.setattr(cli, "build_parser", _parser_running(greedy))
    assert cli.main(["--root", str(tmp_path), "status"]) == 0
    assert torch.get_num_threads() == before


def _parser_running(fn):
    import argparse

    def build(modules=None):
        p = argparse.ArgumentParser()
        p.add_argument("--root", default=".")
        p.add_argument("-v", "--verbose", action="store_true")
        sub = p.add_subparsers(dest="command", required=True)
        sub.add_parser("status").set_defaults(run=fn)
        return p

    return build
