"""Demo world clips: layout, ground truth, decodability, determinism, resume, detectable faces."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from s2f.audio import SAMPLE_RATE
from s2f.demo.identity import clip_variation, generate_identities, read_manifest
from s2f.demo.render import FaceAppearance, render_canonical
from s2f.demo.voices import MIN_CLIP_FRACTION, make_voice_clip
from s2f.demo.world import (
    IDENTITIES,
    MANIFEST,
    WorldConfig,
    generate_world,
    hold_frames,
    portrait_path,
    read_world_manifest,
    render_clip_frame,
)
from s2f.video import read_segment

pytest.importorskip("parselmouth")
pytest.importorskip("av")

SMALL = WorldConfig(identities=3, clips_per_identity=2, seed=0, workers=2)
AAC_PADDING = 2048  # samples the AAC encoder may add at the end of a stream
PCM16_STEP = 1 / 32768  # FLAC stores 16-bit samples: its only error is rounding to this step
H264_MEAN_ERROR = 3.0  # 8-bit levels of mean absolute error allowed at crf 18


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_world(SMALL, tmp_path_factory.mktemp("world_two_workers"))


@pytest.fixture(scope="module")
def world_one_worker(tmp_path_factory) -> Path:
    # Synthesise in this process first: the world must not depend on the caller's espeak state.
    make_voice_clip(generate_identities(1, seed=7)[0], 0, seed=7)
    config = dataclasses.replace(SMALL, workers=1)
    return generate_world(config, tmp_path_factory.mktemp("world_one_worker"))


def _clips(root: Path) -> list[Path]:
    return sorted(root.glob("videos/*/*.mp4"))


def _decoded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    segment = read_segment(path, frame_times=(0.0,))
    return segment.audio, segment.frames[0]


def test_layout_and_manifest_hold_the_ground_truth(world: Path):
    identities = generate_identities(SMALL.identities, SMALL.seed)
    assert read_manifest(world / IDENTITIES) == identities
    records = read_world_manifest(world)
    assert len(records) == SMALL.identities * SMALL.clips_per_identity
    assert [world / r["path"] for r in records] == _clips(world)
    by_id = {identity.id: identity for identity in identities}
    for record in records:
        identity = by_id[record["identity"]]
        assert Path(record["path"]).parent.name == identity.id  # speaker = folder name
        for key in ("gender", "age", "age_decade", "origin", "language", "f0_hz",
                    "vocal_tract_length", "speaking_rate"):
            assert record[key] == identity.to_dict()[key], key
        assert record["appearance"]["face_width"] == identity.appearance["face_width"]
        assert record["speaks_other_language"] == identity.speaks_other_language
        variation = json.loads(json.dumps(clip_variation(identity, record["clip"], SMALL.seed)))
        assert record["variation"] == variation


def test_clips_decode_with_the_full_utterance_and_the_rendered_face(world: Path):
    identity = generate_identities(1, SMALL.seed)[0]
    for path in _clips(world):
        segment = read_segment(path, frame_times=(0.0,))
        assert segment.sample_rate == SAMPLE_RATE and segment.audio.shape[0] == 1
        assert segment.audio.shape[1] >= MIN_CLIP_FRACTION * SMALL.clip_seconds * SAMPLE_RATE
        assert segment.frames[0].shape == (*SMALL.frame_size, 3)
        assert segment.duration >= segment.audio.shape[1] / SAMPLE_RATE - 0.1  # video spans it
    audio, frame = _decoded(world / read_world_manifest(world)[0]["path"])
    # Made in this process after other synthesis, so espeak's carried state may change a few
    # percent of samples (see s2f.demo.voices): compare length, most samples and correlation.
    speech = make_voice_clip(identity, 0, SMALL.seed, SMALL.clip_seconds)  # (N,)
    assert audio.shape[1] == len(speech)  # FLAC: no codec padding
    assert np.mean(np.abs(audio[0] - speech) <= PCM16_STEP) > 0.9
    assert np.corrcoef(audio[0], speech)[0, 1] > 0.9
    rendered = render_clip_frame(identity, 0, SMALL).astype(float)
    assert np.abs(frame.astype(float) - rendered).mean() < H264_MEAN_ERROR


def test_each_speaker_has_a_canonical_portrait(world: Path):
    from PIL import Image

    identities = generate_identities(SMALL.identities, SMALL.seed)
    assert sorted(p.name for p in (world / "portraits").iterdir()) == [f"{i.id}.png" for i in identities]
    for identity in identities:
        portrait = np.asarray(Image.open(world / portrait_path(identity.id)))  # PNG: lossless
        canonical = render_canonical(FaceAppearance(**identity.appearance), SMALL.frame_size)
        np.testing.assert_array_equal(portrait, canonical)
    for record in read_world_manifest(world):
        assert record["portrait"] == portrait_path(record["identity"])


def test_a_missing_portrait_is_remade_without_touching_the_clips(world: Path, tmp_path: Path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    lost = copy / portrait_path(read_world_manifest(copy)[0]["identity"])
    original = lost.read_bytes()
    lost.unlink()
    clips = {path: path.stat().st_mtime_ns for path in _clips(copy)}
    generate_world(SMALL, copy)
    assert lost.read_bytes() == original
    assert {path: path.stat().st_mtime_ns for path in clips} == clips


def test_shards_of_the_world_carry_each_speakers_aligned_portrait(world: Path, tmp_path: Path):
    import webdataset as wds
    from PIL import Image

    from s2f.faces import extract_face
    from shards.build import PORTRAIT_PADDING, BuildConfig, build_shards, complete_shards
    from shards.schema import PORTRAIT, SPLITS, speaker_of
    from shards.sources import source_items

    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    broken = read_world_manifest(copy)[-1]["identity"]
    (copy / portrait_path(broken)).write_bytes(b"not a png")
    out = tmp_path / "shards"
    config = BuildConfig(out=str(out), workers=1, ratios=(1.0, 0.0, 0.0))  # a head needs 2 speakers
    summary = build_shards(source_items("demo", str(copy)), config)
    samples = [s for split in SPLITS for path in complete_shards(out / split)
               for s in wds.WebDataset(str(path), shardshuffle=False)]  # fmt: skip
    assert sorted({speaker_of(s["__key__"]) for s in samples}) == sorted(
        i.id for i in generate_identities(SMALL.identities, SMALL.seed) if i.id != broken)
    for sample in samples:
        speaker = speaker_of(sample["__key__"])
        portrait = np.asarray(Image.open(copy / portrait_path(speaker)))
        expected = extract_face(portrait, "hog", None, 0, PORTRAIT_PADDING).crop.astype(float)
        decoded = np.asarray(Image.open(io.BytesIO(sample[PORTRAIT]))).astype(float)
        assert np.abs(decoded - expected).mean() < 3.0  # JPEG's error only
        as_face_jpg = extract_face(portrait, "hog", None, upsample=0).crop.astype(float)
        assert np.abs(decoded - as_face_jpg).mean() > 10  # the wider margin, not face.jpg's
    failures = [json.loads(line) for split in SPLITS
                for line in (out / split / "failures.jsonl").read_text().splitlines()]  # fmt: skip
    assert len(failures) == SMALL.clips_per_identity == len(summary.failures)
    assert {f["stage"] for f in failures} == {"portrait"}
    assert all(broken in f["reason"] for f in failures)


def test_same_world_whatever_the_worker_count(world: Path, world_one_worker: Path):
    assert (world / MANIFEST).read_bytes() == (world_one_worker / MANIFEST).read_bytes()
    assert (world / IDENTITIES).read_bytes() == (world_one_worker / IDENTITIES).read_bytes()
    paths = [p.relative_to(world) for p in _clips(world)]
    assert paths == [p.relative_to(world_one_worker) for p in _clips(world_one_worker)]
    for portrait in (world / "portraits").iterdir():
        assert portrait.read_bytes() == (world_one_worker / "portraits" / portrait.name).read_bytes()
    for path in paths:
        audio_a, frame_a = _decoded(world / path)
        audio_b, frame_b = _decoded(world_one_worker / path)
        np.testing.assert_array_equal(audio_a, audio_b)
        np.testing.assert_array_equal(frame_a, frame_b)
        assert (world / path).read_bytes() == (world_one_worker / path).read_bytes()


def test_resume_keeps_finished_clips_and_remakes_missing_ones(world: Path, tmp_path: Path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    clips = _clips(copy)
    missing = clips[-1]  # the second clip of an identity: its audio follows the first's
    original = missing.read_bytes()
    missing.unlink()
    (copy / MANIFEST).unlink()
    kept = {path: path.stat().st_mtime_ns for path in clips if path != missing}
    generate_world(SMALL, copy)
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert missing.read_bytes() == original
    assert (copy / MANIFEST).read_bytes() == (world / MANIFEST).read_bytes()


def test_a_script_started_by_path_is_imported_once_not_per_identity(tmp_path: Path):
    # Console scripts (`s2f`) run by path; multiprocessing re-runs such a script in every child,
    # so its imports (Lightning, for `s2f`) must already sit in the fork server.
    log = tmp_path / "imports.log"
    (tmp_path / "heavy_module.py").write_text(
        f"import os\nwith open({str(log)!r}, 'a') as f:\n    f.write(f'{{os.getpid()}}\\n')\n"
        "def helper():\n    return 0\n"
    )
    script = tmp_path / "make_world"  # no .py: started by path, like a console script
    script.write_text(
        "import sys\nfrom heavy_module import helper\n"
        "from s2f.demo.world import WorldConfig, generate_world\n"
        "if __name__ == '__main__':\n"
        "    generate_world(WorldConfig(identities=3, clips_per_identity=1, workers=1), sys.argv[1])\n"
    )
    # cwd: the fork server (python -c) finds modules on the working directory, not the script's
    subprocess.run([sys.executable, str(script), "world"], cwd=tmp_path, check=True, capture_output=True)
    assert len(_clips(tmp_path / "world")) == 3
    importers = log.read_text().split()
    assert len(importers) == len(set(importers)) == 2  # the script's process and the fork server


def test_aac_clips_hold_the_same_speech(world: Path, tmp_path: Path):
    config = dataclasses.replace(SMALL, identities=1, clips_per_identity=1, audio_codec="aac")
    aac = generate_world(config, tmp_path / "aac")
    path = read_world_manifest(aac)[0]["path"]
    lossy, lossless = _decoded(aac / path)[0], _decoded(world / path)[0]  # (1, N)
    assert 0 <= lossy.shape[1] - lossless.shape[1] <= AAC_PADDING
    assert np.corrcoef(lossy[0, : lossless.shape[1]], lossless[0])[0, 1] > 0.9


def test_rejects_an_unknown_audio_codec(tmp_path: Path):
    with pytest.raises(ValueError, match="no such encoder"):
        generate_world(dataclasses.replace(SMALL, audio_codec="nope"), tmp_path)


def test_refuses_to_mix_another_world_into_a_folder(world: Path):
    with pytest.raises(ValueError, match="another out_dir"):
        generate_world(dataclasses.replace(SMALL, seed=1), world)


def test_rejects_odd_frame_sizes(tmp_path: Path):
    with pytest.raises(ValueError, match="even"):
        generate_world(dataclasses.replace(SMALL, frame_size=(225, 224)), tmp_path)


def test_held_frames_cover_the_audio():
    frame = np.zeros((4, 6, 3), np.uint8)
    assert hold_frames(frame, 5.2, 2.0).shape == (11, 4, 6, 3)
    assert hold_frames(frame, 0.0, 2.0).shape == (1, 4, 6, 3)


def test_dlib_hog_finds_every_face_of_the_small_world(world: Path):
    dlib = pytest.importorskip("dlib")
    detector = dlib.get_frontal_face_detector()
    found = [len(detector(_decoded(path)[1], 1)) for path in _clips(world)]
    assert found == [1] * len(found)


# Renders every frame, then detects: dlib's detector has answered differently on byte-identical
# frames depending on what ran just before it in the process (render and detect alternated:
# 89.5-99.5 % found; inside a pytest worker after the evaluation and DataModule tests: 46 %).
HOG_RATE_SCRIPT = """
import dlib, numpy as np
from s2f.demo.identity import generate_identities
from s2f.demo.world import WorldConfig, render_clip_frame
config = WorldConfig(identities=50, clips_per_identity=4)
frames = [render_clip_frame(identity, clip, config)
          for identity in generate_identities(config.identities, config.seed)
          for clip in range(config.clips_per_identity)]
detector = dlib.get_frontal_face_detector()
print(np.mean([len(detector(frame, 1)) > 0 for frame in frames]))
"""


@pytest.mark.slow
def test_dlib_hog_finds_at_least_99_percent_of_faces():
    pytest.importorskip("dlib")
    proc = subprocess.run([sys.executable, "-c", HOG_RATE_SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) >= 0.99
