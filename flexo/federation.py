"""The hand-off between machines: what a publisher ships, where it lands, and whether it is current.

FlexOlmo's setting is owners on their own machines and a central merge. Each party publishes its
hand-off as its own files, so that no two machines ever edit the same file:

- `published/public/artifacts/` — the public artifacts every owner needs (tokenizer, public model,
  public router row, public text), published once by whoever builds them (`flows.public_artifacts`);
- `published/<owner>/package/` — what one owner ships: its expert package (`expert.safetensors` +
  `expert.json`), its router row and its router statistics. Never text, never its full model, loss log
  or checkpoints.

A publisher copies its files into that folder and `dvc add`s it: git then holds one small pointer per
publisher (`published/<name>/<folder>.dvc`, with a `.gitignore` beside it in the same folder) and the DVC
remote holds the bytes (flows/handoff.py does the git and DVC part). A receiver pulls the pointer's
bytes and installs them where the pipeline's stages expect them (:func:`install`), after checking them
(:func:`check_package`): the order public → owners → central is enforced here, with errors that name
who has to run what.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_dir, atomic_path
from flexo.layout import Layout
from flexo.modeling import read_meta
from flexo.package import PACKAGE_META, PACKAGE_TENSORS, ExpertPackage
from flexo.params import PUBLIC, validate_owner_name

PUBLISHED = "published"
PUBLIC_FOLDER = "artifacts"
OWNER_FOLDER = "package"


def handoff_dir(layout: Layout, name: str) -> Path:
    """`published/public/artifacts` or `published/<owner>/package`."""
    validate_owner_name(name, "publisher")
    return layout.root / PUBLISHED / name / (PUBLIC_FOLDER if name == PUBLIC else OWNER_FOLDER)


def pointer(layout: Layout, name: str) -> Path:
    """The git-tracked DVC pointer of a hand-off (`….dvc` beside its folder)."""
    folder = handoff_dir(layout, name)
    return folder.with_name(folder.name + ".dvc")


def handoff_files(layout: Layout, name: str) -> dict[str, Path]:
    """{name inside the hand-off: where the pipeline keeps it} for the public side or one owner."""
    if name == PUBLIC:
        return {"tokenizer": layout.tokenizer, "public_model": layout.public_model,
                "router.safetensors": layout.router_embedding(PUBLIC),
                "router.json": layout.router_embedding(PUBLIC).with_suffix(".json"),
                "curated": layout.curated(PUBLIC), "heldout": layout.heldout(PUBLIC)}
    return {PACKAGE_TENSORS: layout.expert(name) / PACKAGE_TENSORS, PACKAGE_META: layout.expert(name) / PACKAGE_META,
            "router.safetensors": layout.router_embedding(name),
            "router.json": layout.router_embedding(name).with_suffix(".json"),
            "router_stats.safetensors": layout.router_update(name),
            "router_stats.json": layout.router_update(name).with_suffix(".json")}


def _handoff_guard(layout: Layout, name: str) -> OutputGuard:
    """A hand-off folder may replace only an earlier hand-off of the same publisher."""
    names = tuple(handoff_files(layout, name))
    return OutputGuard(f"hand-off of {name!r}", lambda p: all((p / n).exists() for n in names),
                       files=names + tuple(f"{n}/*" for n in names), command="the publish step")


def stage_handoff(layout: Layout, name: str) -> Path:
    """Copy what `name` publishes into its hand-off folder (replacing an earlier one); returns the folder.
    Refuses with one line when something is missing, naming the stage that writes it."""
    sources = handoff_files(layout, name)
    missing = [str(p.relative_to(layout.root)) for p in sources.values() if not p.exists()]
    if missing:
        what = "the public stages" if name == PUBLIC else f"the owner stages of {name!r}"
        raise FlexoError(f"cannot publish {name!r}: {', '.join(missing)} missing; run {what} first")
    folder = handoff_dir(layout, name)
    with atomic_dir(folder, _handoff_guard(layout, name)) as tmp:
        for target, src in sources.items():
            _copy(src, tmp / target)
    return folder


def install(layout: Layout, name: str) -> list[str]:
    """Copy a received hand-off from its folder to where the pipeline's stages read it; returns what was
    installed (relative paths). An owner's package is checked first (:func:`check_package`)."""
    folder = handoff_dir(layout, name)
    if not folder.is_dir():
        raise FlexoError(f"the hand-off of {name!r} is not here ({folder.relative_to(layout.root)}): pull it first")
    if name != PUBLIC:
        check_package(layout, name, folder)
    installed = []
    for source, target in handoff_files(layout, name).items():
        src = folder / source
        if not src.exists():
            raise FlexoError(f"the hand-off of {name!r} lacks {source}: ask {name!r} to publish again")
        if target.is_dir() and not src.is_dir():
            raise FlexoError(f"cannot install {source} of {name!r}: {target} is a folder")
        if src.is_dir():
            with atomic_dir(target) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:
            _copy(src, target)
        installed.append(str(target.relative_to(layout.root)))
    return installed


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)


def check_package(layout: Layout, owner: str, folder: Path | None = None) -> ExpertPackage:
    """A received package: bound to `owner`, intact (sha256), and trained against this public model."""
    folder = folder or handoff_dir(layout, owner)
    package = ExpertPackage.read(folder, owner=owner, folder_name=owner)
    package.verify()
    public_fp = read_meta(layout.public_model).get("fingerprint") if (layout.public_model / "flexo.json").is_file() else None
    if public_fp is None:
        raise FlexoError("no public model here: receive the public artifacts (or run the public stages) first")
    if package.public_fingerprint != public_fp:
        raise FlexoError(f"owner {owner} has not published a package for public model fingerprint {public_fp[:12]}…: "
                         f"its package was trained against {package.public_fingerprint[:12]}…; ask {owner} to pull "
                         f"the public artifacts and rerun its owner flow (python -m flows.owner --owner {owner})")
    return package



def package_state(layout: Layout, owner: str) -> str:
    """At a machine that holds the owner's package but not its data: `missing` (nothing published or
    installed), `outdated` (published anew since it was installed, or trained against another public
    model) or `present`."""
    installed = layout.expert(owner) / PACKAGE_META
    published = handoff_dir(layout, owner) / PACKAGE_META
    if not installed.is_file():
        return "missing" if not pointer(layout, owner).is_file() else "outdated"
    try:
        package = ExpertPackage.read(layout.expert(owner), owner=owner)
        public_fp = read_meta(layout.public_model).get("fingerprint")
    except FlexoError:
        return "outdated"
    if package.public_fingerprint != public_fp:
        return "outdated"
    if published.is_file():
        try:
            shipped = ExpertPackage.read(published.parent, owner=owner, folder_name=owner)
        except FlexoError:
            return "outdated"
        if shipped.tensors_sha256 != package.tensors_sha256:
            return "outdated"
    return "present"


def holds_owner_data(layout: Layout, owners: list[str]) -> list[str]:
    """Owners whose text is on this machine (their inbox documents or curated splits)."""
    here = []
    for owner in owners:
        inbox = layout.owner_inbox(owner)
        has_inbox = inbox.is_dir() and any(p.is_file() and p.name != ".gitkeep" for p in inbox.rglob("*"))
        if has_inbox or layout.curated(owner).exists() or layout.heldout(owner).exists():
            here.append(owner)
    return here
