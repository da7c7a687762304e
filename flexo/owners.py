"""Owners over time: who was withdrawn since the last merge, and removing what they left behind.

Withdrawing an owner is one edit — remove it from `owners:` in params.yaml — and the next merge (the
fan-in stage that reruns when `owners` changes) cleans up after it has succeeded: the owner's curated
data, held-out split, router rows and statistics, extraction report, checkpoints, its `dvc.lock`
entries, and its expert package if the last merge used it. "Withdrawn" is decided from DVC's record of
the last merge only (`dvc.lock`), never from folders on disk, so a package received before its owner is
listed is never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flexo.errors import FlexoError
from flexo.fsutil import atomic_file, remove_path
from flexo.layout import Layout
from flexo.params import PUBLIC, Params, load_params, validate_owner_name

log = logging.getLogger(__name__)
# The per-owner stages of dvc.yaml (`<stage>@<owner>`), whose dvc.lock entries go with a withdrawn owner.
OWNER_STAGES = ("curate", "embed", "train_expert", "router_update", "audit", "score")


def read_lock(root: Path) -> dict:
    """dvc.lock as a mapping ({} when there is none); a broken one is a one-line FlexoError."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlexoError(f"{lock} is not valid YAML ({first}): restore it from git (`git checkout dvc.lock`) "
                         "or delete it and rerun `dvc repro`") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        raise FlexoError(f"{lock} is not a DVC lock file (no `stages:` mapping): restore it from git "
                         "(`git checkout dvc.lock`) or delete it and rerun `dvc repro`")
    return data


def _dig(data, *keys):
    """data[k1][k2]… where every level is a mapping, else None (dvc.lock is edited by hand sometimes)."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _cached(root: Path, md5: str) -> Path:
    """Where DVC 3 keeps an object in the project's default cache."""
    return Path(root) / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def _last_merged_experts(layout: Layout, lock: dict) -> set[str]:
    """The owners whose packages the last merge merged: models/merged/flexo.json, or — since `dvc repro`
    removes a stage's outputs before rerunning it — the copy of that file in DVC's cache."""
    meta = None
    current = layout.merged / "flexo.json"
    with contextlib.suppress(OSError, ValueError):
        if current.is_file():
            meta = json.loads(current.read_text(encoding="utf-8"))
        else:
            outs = _dig(lock, "stages", "merge", "outs")
            outs = outs if isinstance(outs, list) else []
            md5 = next((o.get("md5") for o in outs if isinstance(o, dict) and o.get("path") == "models/merged"), None)
            if isinstance(md5, str) and md5.endswith(".dir"):
                listing = json.loads(_cached(layout.root, md5[:-4] + ".dir").read_text())
                entry = next((e for e in listing if isinstance(e, dict) and e.get("relpath") == "flexo.json"), None)
                if entry and isinstance(entry.get("md5"), str):
                    meta = json.loads(_cached(layout.root, entry["md5"]).read_text(encoding="utf-8"))
    experts = meta.get("experts") if isinstance(meta, dict) else None
    return {e for e in experts if isinstance(e, str) and e != PUBLIC} if isinstance(experts, list) else set()


@dataclass
class Withdrawal:
    """Owners withdrawn since the last merge, and which of them that merge actually merged."""

    owners: list[str]
    merged_before: set[str] = field(default_factory=set)
    source: str = "none"


def withdrawal_plan(params: Params, layout: Layout) -> Withdrawal:
    """Owners that the last merge had and params.yaml no longer lists. "The last merge" is DVC's record of
    it (dvc.lock's `merge` params); without one (a project run by hand), the merged model's flexo.json.
    Nothing else — a folder on disk that no merge ever used, e.g. a package received before its owner
    was added to params.yaml — is ever treated as withdrawn. A merge run with another params file than
    the project's own (`--params`) withdraws nobody: only the project's params.yaml speaks for owners."""
    own = load_params(layout.params).owners if layout.params.is_file() else None
    if own != params.owners:
        log.warning("the owners given (%s) are not those of %s (%s): no withdrawal clean-up", params.owners,
                    layout.params, own)
        return Withdrawal([])
    lock = read_lock(layout.root)
    merged_before = _last_merged_experts(layout, lock)
    before = _dig(lock, "stages", "merge", "params", "params.yaml", "owners")
    source = "dvc.lock"
    if not isinstance(before, list):
        before, source = sorted(merged_before), "models/merged/flexo.json"
    withdrawn = []
    for name in before:
        try:
            validate_owner_name(name, "dvc.lock owner")  # never build a path from anything else
        except FlexoError as e:
            log.warning("ignoring %s", e)
            continue
        if name not in params.owners and name not in withdrawn:
            withdrawn.append(name)
    return Withdrawal(withdrawn, merged_before, source if withdrawn else "none")


def prune_withdrawn(layout: Layout, plan: Withdrawal) -> dict[str, list[str]]:
    """Remove what withdrawn owners left: curated data, held-out split, router rows and statistics,
    audit report, shipped scores, checkpoints, their `dvc.lock` entries — and the expert package only if the last
    merge merged it. Called by the merge stage after it has succeeded; prints every removal."""
    removed: dict[str, list[str]] = {}
    for owner in plan.owners:
        paths = [layout.curated(owner), layout.heldout(owner),
                 layout.router_embedding(owner), layout.router_embedding(owner).with_suffix(".json"),
                 layout.router_update(owner), layout.router_update(owner).with_suffix(".json"),
                 layout.results / "extraction" / f"{owner}.json", layout.scores(owner),
                 layout.checkpoints(f"expert-{owner}")]
        if owner in plan.merged_before:
            paths.append(layout.expert(owner))
        elif layout.expert(owner).exists():
            log.warning("withdrawn owner %s: keeping %s (no earlier merge used it)", owner,
                        layout.expert(owner).relative_to(layout.root))
        for path in paths:
            if path.exists() or path.is_symlink():
                remove_path(path)
                rel = path.relative_to(layout.root).as_posix()
                removed.setdefault(owner, []).append(rel)
                log.info("withdrawn owner %s: removed %s", owner, rel)
    lock_path = layout.root / "dvc.lock"
    if plan.owners and lock_path.is_file():
        data = read_lock(layout.root)
        stages = data.get("stages", {})
        stale = [k for k in stages if "@" in k and k.split("@", 1)[1] in plan.owners
                 and k.split("@", 1)[0] in OWNER_STAGES]
        for k in stale:
            del stages[k]
        if stale:
            with atomic_file(lock_path) as f:
                yaml.safe_dump(data, f, sort_keys=False)
            log.info("withdrawn owners %s: dropped %d dvc.lock entries", plan.owners, len(stale))
    return removed
