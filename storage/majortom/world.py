"""The descriptor a synthetic world carries beside its ``Core-*`` datasets: ``<root>/world.json``.

``copgen world`` (and the demo) write it; a source with one is synthetic (procedural scenes, no
Copernicus data) and declares its thumbnail sizes, which readers then expect instead of the published
1068 / 356 px. This module is the one place that knows the file's name and fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from copgen.errors import CopgenError
from copgen.storage.fsutil import join_url, redact_url

WORLD_FILE = "world.json"


class WorldError(CopgenError):
    """A ``world.json`` that cannot be read; the message names the file."""


@dataclass(frozen=True)
class World:
    """A synthetic world's descriptor (the fields ``copgen world`` records)."""

    url: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def thumbnail_sizes(self) -> dict[str, int]:
        """Thumbnail side per modality name, as written."""
        return {m: int(v) for m, v in dict(self.meta.get("thumbnail_sizes", {})).items()}

    @property
    def cells(self) -> list[str]:
        return [str(c) for c in self.meta.get("cells", [])]

    @property
    def synthetic(self) -> bool:
        return bool(self.meta.get("synthetic", True))


def read_world(root: str | None, storage_options: Mapping[str, Any] | None = None) -> World | None:
    """The world descriptor of a source root, or ``None`` when the source is not a synthetic world."""
    if not root:
        return None
    url = join_url(root, WORLD_FILE)
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    if not fs.exists(path):
        return None
    try:
        meta = json.loads(fs.cat_file(path))
    except (OSError, ValueError) as exc:
        raise WorldError(f"{redact_url(url)}: unreadable world descriptor ({exc})") from None
    if not isinstance(meta, dict):
        raise WorldError(f"{redact_url(url)}: a world descriptor is a JSON object, got {type(meta).__name__}")
    return World(root, meta)


def write_world_descriptor(root: str, meta: Mapping[str, Any],
                           storage_options: Mapping[str, Any] | None = None) -> World:
    """Write ``<root>/world.json`` (after the datasets: its presence says the world is complete)."""
    with fsspec.open(join_url(root, WORLD_FILE), "w", **dict(storage_options or {})) as f:
        json.dump(dict(meta), f, indent=1)
    return World(root, dict(meta))
