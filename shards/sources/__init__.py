"""Shard sources: each turns a dataset layout into `SourceItem`s for the builder.

A source is a function `(source: str, **options) -> Iterable[SourceItem]`, registered in
`SOURCES` by the name `s2f shards build --kind NAME` uses. Items must come in a stable order:
the builder's shard contents and resumes depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Protocol

# kind -> "module:function"; imported on use so a source's extras are only needed when used.
SOURCES = {
    "videos": "shards.sources.videos:video_folder_items",
    "demo": "shards.sources.videos:demo_world_items",
    "avspeech": "shards.sources.avspeech:avspeech_items",
    "voxceleb": "shards.sources.voxceleb:voxceleb_items",
}


class Fetcher(Protocol):
    """Makes an item's media local (a download, a copy from an object store); picklable."""

    def fetch(self, item: "SourceItem") -> tuple[Path, float]:
        """(local media file, the time in it where the item's time 0 lies: a section download
        starts at the section's start). Raises shards.build.ItemFailed("download", reason)."""


@dataclass(frozen=True)
class SourceItem:
    """One clip to turn into a sample.

    `key` is the schema key `<source>/<speaker>/<clip>`; `path` the video (or, with `image`,
    the audio) file; `start`/`end` the segment in seconds (end None: to the end of the file);
    `center_xy` the speaker's face centre, normalised (x, y), when the source knows it;
    `image` a face frame to use instead of a video frame; `portrait` a frontal, neutral photo
    of the speaker, the face decoder's target (SPEC section 6), when the source has one;
    `split` forces the split (official test identities); `fetcher` makes `path` local first;
    `meta` goes into the sample's json.
    """

    key: str
    speaker: str
    path: Path
    start: float = 0.0
    end: float | None = None
    center_xy: tuple[float, float] | None = None
    image: Path | None = None
    portrait: Path | None = None
    split: str | None = None
    fetcher: Fetcher | None = None
    meta: dict = field(default_factory=dict)


def source_items(kind: str, source: str, **options) -> list[SourceItem]:
    if kind not in SOURCES:
        raise ValueError(f"unknown source kind {kind!r}; choose one of {sorted(SOURCES)}")
    module, function = SOURCES[kind].split(":")
    return list(getattr(import_module(module), function)(source, **options))
