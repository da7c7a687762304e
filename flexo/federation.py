"""The hand-off between machines: what a publisher ships, where it lands, and whether it is current.

FlexOlmo's setting is owners on their own machines and a central merge. Each party publishes its
hand-offs as its own files, so that no two machines ever edit the same file. In order:

1. `published/public/artifacts/` — the public artifacts every owner needs (tokenizer, public model,
   public router row, public text), published once by whoever builds them (`flows.public_artifacts`);
2. `published/<owner>/package/` — what one owner ships before the merge: its expert package
   (`expert.safetensors` + `expert.json`), its router row and its router statistics. Never text, never
   its full model, loss log or checkpoints;
3. `published/central/models/` — the merged and the router-tuned model, published by the centre after
   `merge` and `router_tune`, so that each owner can score them where its held-out text is;
4. `published/<owner>/scores/` — the owner's `results/scores/<owner>.json`: every model's bits per byte
   and routing shares on its own held-out split (numbers only), from which the centre's `evaluate`
   builds the table.

A publisher copies its files into that folder and `dvc add`s it: git then holds one small pointer per
publisher and kind (`published/<name>/<kind>.dvc`, with a `.gitignore` beside it in the same folder) and
the DVC remote holds the bytes (flows/handoff.py does the git and DVC part). A receiver pulls the
pointer's bytes and installs them where the pipeline's stages expect them (:func:`install`), after
checking them (:func:`check_package`, :func:`scores_state`): the order public → owners → central →
owners → central is enforced here, with errors that name who has to run what.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_dir, atomic_path
from flexo.layout import Layout
from flexo.model_files import read_meta
from flexo.package import PACKAGE_META, PACKAGE_TENSORS, ExpertPackage
from flexo.params import CENTRAL, PUBLIC, validate_owner_name

PUBLISHED = "published"
# What each kind of hand-off is, and who publishes it.
PUBLIC_FOLDER = "artifacts"  # public: tokenizer, public model, public router row, public text
OWNER_FOLDER = "package"     # an owner, before the merge: expert package, router row, router statistics
SCORES_FOLDER = "scores"     # an owner, after the merge: its scores of every model on its own held-out split
MODELS_FOLDER = "models"     # the centre, after the merge: the merged and router-tuned models


def _default_kind(name: str) -> str:
    return {PUBLIC: PUBLIC_FOLDER, CENTRAL: MODELS_FOLDER}.get(name, OWNER_FOLDER)


def handoff_dir(layout: Layout, name: str, kind: str | None = None) -> Path:
    """`published/public/artifacts`, `published/<owner>/package|scores` or `published/central/models`."""
    if name != CENTRAL:
        validate_owner_name(name, "publisher")
    kind = kind or _default_kind(name)
    allowed = {PUBLIC: (PUBLIC_FOLDER,), CENTRAL: (MODELS_FOLDER,)}.get(name, (OWNER_FOLDER, SCORES_FOLDER))
    if kind not in allowed:
        raise FlexoError(f"{name!r} publishes no {kind!r} hand-off (only {', '.join(allowed)})")
    return layout.root / PUBLISHED / name / kind


def pointer(layout: Layout, name: str, kind: str | None = None) -> Path:
    """The git-tracked DVC pointer of a hand-off (`….dvc` beside its folder)."""
    folder = handoff_dir(layout, name, kind)
    return folder.with_name(folder.name + ".dvc")


def handoff_files(layout: Layout, name: str, kind: str | None = None) -> dict[str, Path]:
    """{name inside the hand-off: where the pipeline keeps it} for one kind of hand-off."""
    kind = handoff_dir(layout, name, kind).name
    if kind == PUBLIC_FOLDER:
        return {"tokenizer": layout.tokenizer, "public_model": layout.public_model,
                "router.safetensors": layout.router_embedding(PUBLIC),
                "router.json": layout.router_embedding(PUBLIC).with_suffix(".json"),
                "curated": layout.curated(PUBLIC), "heldout": layout.heldout(PUBLIC)}
    if kind == MODELS_FOLDER:
        return {"merged": layout.merged, "merged-rt": layout.merged_rt}
    if kind == SCORES_FOLDER:
        return {"scores.json": layout.scores(name)}
    return {PACKAGE_TENSORS: layout.expert(name) / PACKAGE_TENSORS, PACKAGE_META: layout.expert(name) / PACKAGE_META,
            "router.safetensors": layout.router_embedding(name),
            "router.json": layout.router_embedding(name).with_suffix(".json"),
            "router_stats.safetensors": layout.router_update(name),
            "router_stats.json": layout.router_update(name).with_suffix(".json")}


def _handoff_guard(layout: Layout, name: str, kind: str) -> OutputGuard:
    """A hand-off folder may replace only an earlier hand-off of the same publisher and kind."""
    names = tuple(handoff_files(layout, name, kind))
    return OutputGuard(f"hand-off of {name!r}", lambda p: all((p / n).exists() for n in names),
                       files=names + tuple(f"{n}/*" for n in names), command="the publish step")


def stage_handoff(layout: Layout, name: str, kind: str | None = None) -> Path:
    """Copy what `name` publishes into its hand-off folder (replacing an earlier one); returns the folder.
    Refuses with one line when something is missing, naming the stage that writes it."""
    folder = handoff_dir(layout, name, kind)
    sources = handoff_files(layout, name, folder.name)
    missing = [str(p.relative_to(layout.root)) for p in sources.values() if not p.exists()]
    if missing:
        what = {PUBLIC_FOLDER: "the public stages", MODELS_FOLDER: "the central merge stages (merge, router_tune)",
                SCORES_FOLDER: f"`flexo score --owner {name}`"}.get(folder.name, f"the owner stages of {name!r}")
        raise FlexoError(f"cannot publish {name!r}: {', '.join(missing)} missing; run {what} first")
    with atomic_dir(folder, _handoff_guard(layout, name, folder.name)) as tmp:
        for target, src in sources.items():
            _copy(src, tmp / target)
    return folder


def install(layout: Layout, name: str, kind: str | None = None) -> list[str]:
    """Copy a received hand-off from its folder to where the pipeline's stages read it; returns what was
    installed (relative paths). An owner's package is checked first (:func:`check_package`)."""
    folder = handoff_dir(layout, name, kind)
    if not folder.is_dir():
        raise FlexoError(f"the hand-off of {name!r} is not here ({folder.relative_to(layout.root)}): pull it first")
    if folder.name == OWNER_FOLDER:
        check_package(layout, name, folder)
    installed = []
    for source, target in handoff_files(layout, name, folder.name).items():
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


def scores_state(layout: Layout, owner: str, fingerprints: dict[str, str]) -> str:
    """At the centre, an owner's installed scores: `missing`, `stale` (scored other models than
    `fingerprints`, :func:`flexo.scoring.model_fingerprints`) or `current`."""
    import json

    path = layout.scores(owner)
    if not path.is_file():
        return "missing"
    try:
        shipped = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "stale"
    return "current" if isinstance(shipped, dict) and shipped.get("fingerprints") == fingerprints else "stale"
