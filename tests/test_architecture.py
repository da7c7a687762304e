"""The shape of the code, checked from its source: no import circle, stages depend only on the library,
no private name imported across modules, no module over about 600 lines, and every stage module
registered with the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("flexo", "stages", "flows")
MAX_LINES = 600


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in the file, at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                # `from flexo import sources` imports the module flexo.sources; `from x import f` a name of x
                found.append((sub, "", node.lineno) if sub in known else (base, a.name, node.lineno))
    return found


def internal_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _ in imports(path, known):
            # `import flexo.x.y` imports flexo.x.y (and its parents, which must then not import it back)
            if target in known and target != m:
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(internal_graph()) == []


def test_a_cycle_is_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_import_only_the_library():
    bad = [(m, t) for m, targets in internal_graph().items() if m.startswith("stages.")
           for t in targets if not t.startswith("flexo")]
    assert bad == []


def test_the_library_imports_no_stage_or_flow_except_the_cli():
    bad = [(m, t) for m, targets in internal_graph().items() if m.startswith("flexo") and m != "flexo.cli"
           for t in targets if t.startswith(("stages", "flows"))]
    assert bad == []


def test_no_private_name_is_imported_across_modules():
    mods = modules()
    bad = []
    for m, path in mods.items():
        for target, name, line in imports(path, set(mods)):
            if name.startswith("_") and not name.startswith("__") and target != m and target.split(".")[0] in PACKAGES:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name} from {target}")
    assert bad == []


@pytest.mark.parametrize("path", [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_is_too_big(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_every_stage_module_is_a_cli_command():
    from flexo.cli import STAGES

    on_disk = {p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__"}
    assert set(STAGES) == on_disk


def test_no_flow_module_shadows_an_installed_module():
    """Prefect runs a deployment's entrypoint with flows/ on sys.path: a flows/public.py once hid the
    `public` package that DVC's lock library imports, and every deployment run failed."""
    import pkgutil

    installed = {m.name for m in pkgutil.iter_modules() if not str(getattr(m.module_finder, "path", "")).startswith(str(REPO))}
    assert [p.stem for p in (REPO / "flows").glob("*.py") if p.stem in installed] == []
