"""Where every artifact lives, relative to the project root (the folder holding params.yaml).

One place for paths keeps the CLI, dvc.yaml and the Prefect flows in agreement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, root: Path | str = ".") -> "Layout":
        return cls(Path(root).resolve())

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def downloads(self) -> Path:
        """Download cache of the registry packages that hold the real text: project-local by default;
        `FLEXO_DOWNLOADS` points several clones (or the tests) at one shared cache."""
        shared = os.environ.get("FLEXO_DOWNLOADS")
        return Path(shared) if shared else self.root / ".cache" / "downloads"

    def owner_inbox(self, owner: str) -> Path:
        """Where an owner drops its own documents (.txt, .jsonl with a `text` field)."""
        return self.root / "data" / "owners" / owner

    def curated(self, name: str) -> Path:
        """Train and val splits plus the manifest: read only by that owner's own stages."""
        return self.root / "data" / "curated" / name

    def heldout(self, name: str) -> Path:
        """The held-out test split, kept apart so that evaluation depends on nothing an owner trains on."""
        return self.root / "data" / "heldout" / name

    def split_file(self, name: str, split: str) -> Path:
        folder = self.heldout(name) if split == "test" else self.curated(name)
        return folder / f"{split}.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "models" / "tokenizer"

    @property
    def public_model(self) -> Path:
        return self.root / "models" / "public"

    def router_embedding(self, name: str) -> Path:
        return self.root / "models" / "router" / f"{name}.safetensors"

    def expert(self, owner: str) -> Path:
        return self.root / "models" / "experts" / owner

    def router_update(self, owner: str) -> Path:
        """An owner's federated router update: the change to the merged model's router rows, no data."""
        return self.root / "models" / "router_updates" / f"{owner}.safetensors"

    @property
    def merged(self) -> Path:
        return self.root / "models" / "merged"

    @property
    def merged_rt(self) -> Path:
        return self.root / "models" / "merged-rt"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def scores(self, owner: str) -> Path:
        """What an owner's `score` stage ships: every model's bits per byte on its held-out split, numbers only."""
        return self.results / "scores" / f"{owner}.json"

    def protected(self) -> tuple[Path, ...]:
        """Folders that a user-given `--out` may neither be nor lie inside nor contain: the owners' data,
        the public artifacts, the owners' packages and statistics, and the project's own machinery."""
        r = self.root
        return (r / "data", self.tokenizer, self.public_model, r / "models" / "experts", r / "models" / "router",
                r / "models" / "router_updates", r / ".git", r / ".dvc", r / ".cache", r / "flexo", r / "stages",
                r / "flows", r / "tests")

    def checkpoints(self, name: str) -> Path:
        return self.root / ".cache" / "checkpoints" / name
