"""The `voxceleb` source: the official VoxCeleb1 / VoxCeleb2 layouts plus their meta CSVs.

Audio: `<id>/<video_id>/<clip>.wav` (VoxCeleb1) or `.m4a` (VoxCeleb2) anywhere under the source
folder (e.g. `wav/`, `dev/aac/`). The face comes from a video of the same clip where present
(`<id>/<video_id>/<clip>.mp4`, e.g. VoxCeleb2's `mp4/`), else from a face frame or crop the user
has (`<id>/<video_id>/<clip>.jpg|png`, or the first image in a folder `<id>/<video_id>/<clip>/`).
A clip with neither is still listed, so the build records it as a failure instead of dropping it.

Meta CSVs (`vox1_meta.csv`: tab-separated `VoxCeleb1 ID, VGGFace1 ID, Gender, Nationality, Set`;
`vox2_meta.csv`: comma-separated `VoxCeleb2 ID, VGGFace2 ID, Gender, Set`) found in the source
folder give each sample's `attributes` (gender as "male"/"female", nationality, set). The speaker
id is the layout's `id*` folder; with `official_test=True`, VoxCeleb1's official test identities
(Set = test) are forced into the test split.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path

from shards.schema import sample_key
from shards.sources import SourceItem

AUDIO_SUFFIXES = (".wav", ".m4a")
VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPEAKER_DIR = re.compile(r"^id\d+$")
GENDERS = {"m": "male", "f": "female", "male": "male", "female": "female"}


def _clip_id(path: Path) -> tuple[str, str, str] | None:
    """(speaker, video, clip) of `.../id*/<video>/<clip>.<ext>`, else None."""
    parts = path.with_suffix("").parts
    if len(parts) >= 3 and SPEAKER_DIR.match(parts[-3]):
        return parts[-3], parts[-2], parts[-1]
    return None


def _index(root: Path, suffixes: tuple[str, ...]) -> dict[tuple[str, str, str], Path]:
    found = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in suffixes and (clip := _clip_id(path)) is not None:
            found.setdefault(clip, path)
    return found


def _image_folders(root: Path) -> dict[tuple[str, str, str], Path]:
    """Folders `<id>/<video>/<clip>/` holding face frames -> their first image."""
    found = {}
    for image in sorted(root.rglob("*")):
        parts = image.parent.parts
        if image.suffix.lower() in IMAGE_SUFFIXES and len(parts) >= 3 and SPEAKER_DIR.match(parts[-3]):
            found.setdefault((parts[-3], parts[-2], parts[-1]), image)
    return found


def _official_test(attributes: dict, enabled: bool) -> str | None:
    """VoxCeleb1's official test identities go to the test split when enabled."""
    is_vox1_test = attributes.get("set") == "test" and "vox1" in attributes.get("meta_file", "")
    return "test" if enabled and is_vox1_test else None


def _meta_rows(path: Path) -> list[dict[str, str]]:
    text = path.read_text()
    dialect = "excel-tab" if "\t" in text.splitlines()[0] else "excel"
    rows = list(csv.reader(text.splitlines(), dialect=dialect))
    header = [h.strip().lower() for h in rows[0]]
    return [{header[i]: cell.strip() for i, cell in enumerate(row)} for row in rows[1:] if row]


def read_meta(root: Path) -> dict[str, dict]:
    """speaker id -> attributes from every `*meta*.csv` under `root`."""
    attributes: dict[str, dict] = {}
    for path in sorted(root.rglob("*meta*.csv")):
        for row in _meta_rows(path):
            speaker = next(v for k, v in row.items() if k.startswith("voxceleb"))
            record = {"set": row.get("set", ""), "meta_file": path.name}
            if "gender" in row:
                record["gender"] = GENDERS.get(row["gender"].lower(), row["gender"])
            if "nationality" in row:
                record["nationality"] = row["nationality"]
            attributes[speaker] = record
    return attributes


def voxceleb_items(source: str, official_test: bool = True) -> Iterator[SourceItem]:
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such VoxCeleb folder")
    audio = _index(root, AUDIO_SUFFIXES)
    if not audio:
        raise FileNotFoundError(f"{root}: no id*/<video>/<clip>.wav|m4a files; is this VoxCeleb?")
    videos, images = _index(root, VIDEO_SUFFIXES), _index(root, IMAGE_SUFFIXES)
    images = {**_image_folders(root), **images}
    meta = read_meta(root)
    for clip, audio_path in audio.items():
        speaker, video, name = clip
        attributes = meta.get(speaker, {})
        yield SourceItem(
            key=sample_key("voxceleb", speaker, f"{video}_{name}"), speaker=speaker,
            path=videos.get(clip, audio_path), image=None if clip in videos else images.get(clip),
            split=_official_test(attributes, official_test), meta={"video_id": video, "attributes": attributes},
        )  # fmt: skip
