"""AVSpeech and VoxCeleb sources, the robustness cases, and array builds."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from shards.build import BuildConfig, build_shards, complete_shards, merge, shard_keys
from shards.schema import SPLITS, SplitIndex
from shards.sources import source_items
from shards.sources.avspeech import YtDlpFetcher
from tests.video_factory import FPS, face_frame, face_video, two_face_video, voice, write_mp4

ROOT = Path(__file__).resolve().parent.parent
ALL_TRAIN = (1.0, 0.0, 0.0)


def samples(out: Path) -> dict[str, dict]:
    """key -> decoded json of every sample in every split."""
    found = {}
    for split in SPLITS:
        shards = [str(p) for p in complete_shards(out / split)]
        for sample in wds.WebDataset(shards, shardshuffle=False) if shards else []:
            found[sample["__key__"]] = {**json.loads(sample["json"]), "split": split}
    return found


def failures(out: Path) -> dict[str, dict]:
    records = {}
    for split in SPLITS:
        for line in (out / split / "failures.jsonl").read_text().splitlines():
            record = json.loads(line)
            records[record["item"]] = record
    return records


# --- AVSpeech --------------------------------------------------------------------------------


def test_ytdlp_command_line_is_exact(tmp_path):
    fetcher = YtDlpFetcher(cache_dir=str(tmp_path))
    out = tmp_path / "x.mp4"
    assert fetcher.command_line("AbC-12_xyz", out, (12.5, 18.25)) == [
        "yt-dlp", "--quiet", "--no-warnings", "--no-playlist", "--no-progress",
        "--format", "bv*[height<=360][ext=mp4]+ba[ext=m4a]/b[height<=360][ext=mp4]/b[height<=360]/w",
        "--merge-output-format", "mp4", "--remux-video", "mp4", "--socket-timeout", "30",
        "--output", str(out), "--download-sections", "*12.500-18.250", "--force-keyframes-at-cuts",
        "https://www.youtube.com/watch?v=AbC-12_xyz",
    ]  # fmt: skip
    whole = fetcher.command_line("AbC-12_xyz", out, None)
    assert "--download-sections" not in whole and whole[-1] == "https://www.youtube.com/watch?v=AbC-12_xyz"


@pytest.fixture(scope="module")
def avspeech(tmp_path_factory):
    """A CSV whose downloads are served from local files by tests/fake_ytdlp.py."""
    root = tmp_path_factory.mktemp("avspeech")
    served = root / "served"
    face_video(served / "solo.mp4", 1, 0, seconds=8.0)
    two_face_video(served / "pair.mp4", seconds=6.0)
    face_video(served / "gone.mp4", 2, 0)
    face_video(served / "lonely.mp4", 3, 0, seconds=3.0)
    (served / "gone.dead").touch()  # removed from the site
    rows = [
        "solo,2.0,6.0,0.5,0.5",  # one segment: a section download
        "pair,0.0,3.0,0.27,0.5",  # two segments: the whole video, downloaded once
        "pair,3.0,6.0,0.73,0.5",
        "gone,0.0,2.0,0.5,0.5",  # dead link
        "missing,0.0,2.0,0.5,0.5",  # transient errors until the retries run out
        "lonely,0.5,2.5,0.95,0.95",  # nobody near (x, y)
    ]
    (root / "avspeech.csv").write_text("\n".join(rows) + "\n")
    command = f"{sys.executable} {ROOT}/tests/fake_ytdlp.py --src {served} --id {{id}} --out {{out}} --start {{start}} --end {{end}}"
    items = source_items("avspeech", str(root / "avspeech.csv"), cache_dir=str(root / "cache"),
                         command=tuple(command.split()))
    fast = dataclasses.replace(items[0].fetcher, retries=1, backoff_s=0.01, min_interval_s=0.0)
    items = [dataclasses.replace(item, fetcher=fast) for item in items]
    out = root / "out"
    build_shards(items, BuildConfig(out=str(out), ratios=ALL_TRAIN))
    return root, out, items


def test_avspeech_rows_become_samples_or_recorded_failures(avspeech):
    root, out, _ = avspeech
    built, failed = samples(out), failures(out)
    assert set(built) == {"avspeech/solo/solo_2_000", "avspeech/pair/pair_0_000", "avspeech/pair/pair_3_000"}
    assert failed["avspeech/gone/gone_0_000"]["stage"] == "download"
    assert "gone" in failed["avspeech/gone/gone_0_000"]["reason"]
    assert failed["avspeech/missing/missing_0_000"]["stage"] == "download"
    assert "503" in failed["avspeech/missing/missing_0_000"]["reason"]
    assert failed["avspeech/lonely/lonely_0_500"]["stage"] == "face"
    assert "not in view" in failed["avspeech/lonely/lonely_0_500"]["reason"]
    dead = [json.loads(l)["id"] for l in (root / "cache" / "dead.jsonl").read_text().splitlines()]
    assert dead == ["gone"]


def test_avspeech_center_picks_the_speaker(avspeech):
    _, out, _ = avspeech
    built = samples(out)
    left, right = built["avspeech/pair/pair_0_000"], built["avspeech/pair/pair_3_000"]
    assert left["faces_found"] == 2 and right["faces_found"] == 2
    assert (left["face_box"][0] + left["face_box"][2]) / 2 < 160 < (right["face_box"][0] + right["face_box"][2]) / 2


def test_avspeech_downloads_each_video_once_and_never_asks_for_dead_ones_again(avspeech):
    root, out, items = avspeech
    calls = (root / "served" / "calls.log").read_text().splitlines()
    assert sum(c.startswith("pair ") for c in calls) == 1  # whole video, shared by its two rows
    assert [c for c in calls if c.startswith("solo ")] == ["solo 2.000 6.000"]  # only the section
    assert sum(c.startswith("missing ") for c in calls) == 2  # first try + one retry
    build_shards(items, BuildConfig(out=str(out), ratios=ALL_TRAIN))
    again = (root / "served" / "calls.log").read_text().splitlines()[len(calls):]
    assert not any(c.startswith("gone ") for c in again)


# --- VoxCeleb --------------------------------------------------------------------------------


def write_wav(path: Path, seconds: float, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, voice(seconds, 110 + 7 * seed, seed=seed), 16_000)


@pytest.fixture(scope="module")
def voxceleb(tmp_path_factory):
    root = tmp_path_factory.mktemp("vox1")
    for s, speaker in enumerate(["id10001", "id10002", "id10003"]):
        write_wav(root / "wav" / speaker / "vidA" / "00001.wav", 3.0, s)
    face_video(root / "video" / "id10001" / "vidA" / "00001.mp4", 1, 0, seconds=3.0)
    frame_dir = root / "faces" / "id10002" / "vidA" / "00001"
    frame_dir.mkdir(parents=True)
    Image.fromarray(face_frame(2)).save(frame_dir / "0001.jpg")
    Image.fromarray(face_frame(3)).save(root / "id10003_face.jpg")  # not in the layout: no face
    (root / "vox1_meta.csv").write_text(
        "VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet\n"
        "id10001\tA.J._Buckley\tm\tIreland\tdev\n"
        "id10002\tA.R._Rahman\tm\tIndia\tdev\n"
        "id10003\tAaron_Tveit\tf\tUSA\ttest\n"
    )
    out = root / "out"
    build_shards(source_items("voxceleb", str(root)), BuildConfig(out=str(out), ratios=ALL_TRAIN))
    return out


def test_voxceleb_attributes_and_official_test_split(voxceleb):
    built, failed = samples(voxceleb), failures(voxceleb)
    first, second = built["voxceleb/id10001/vidA_00001"], built["voxceleb/id10002/vidA_00001"]
    assert first["attributes"]["gender"] == "male" and first["attributes"]["nationality"] == "Ireland"
    assert second["attributes"]["nationality"] == "India"  # face from a frame image, no video
    assert first["split"] == second["split"] == "train"
    assert failed["voxceleb/id10003/vidA_00001"]["stage"] == "video"  # no video, no face image
    index = SplitIndex.read(voxceleb / "test")
    assert index.num_samples == 0  # id10003 was forced to test, then failed: nothing leaks to train


# --- robustness: every case works or is recorded with its stage ------------------------------


@pytest.fixture(scope="module")
def robustness(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    src = root / "src"
    face_video(src / "ok" / "base.mp4", 1, 0)
    good = (src / "ok" / "base.mp4").read_bytes()
    (src / "truncated").mkdir(parents=True)
    (src / "truncated" / "half.mp4").write_bytes(good[: len(good) // 2])
    write_mp4(src / "audio_only" / "sound.mp4", None, FPS, voice(2.0, 120))
    face_video(src / "silent" / "zeros.mp4", 3, 0, audio=False)
    frames = np.repeat(face_frame(4)[None], 10, axis=0)
    write_mp4(src / "silent" / "quiet.mp4", frames, FPS, np.zeros(32_000, np.float32))
    face_video(src / "short" / "tiny.mp4", 5, 0, seconds=0.6)
    face_video(src / "loop" / "clip.mp4", 6, 0, seconds=2.5)
    times = np.cumsum(np.r_[0, np.random.default_rng(0).uniform(0.05, 0.4, 11)])
    write_mp4(src / "vfr" / "clip.mp4", np.repeat(face_frame(7)[None], 12, 0), FPS, voice(2.5, 130),
              frame_times=list(times))
    # A phone stores the sensor's sideways picture and a display rotation that makes it upright.
    sideways = np.rot90(face_frame(8), k=1)  # counter-clockwise; the player turns it back clockwise
    write_mp4(src / "rotated" / "clip.mp4", np.repeat(sideways[None], 10, 0), FPS, voice(2.0, 140),
              rotation_deg=90)
    for rate, channels in [(8_000, 1), (22_050, 2), (44_100, 2), (48_000, 1)]:
        face_video(src / f"rate{rate}" / f"c{channels}.mp4", 9, 0, rate=rate, channels=channels)
    out = root / "out"
    build_shards(source_items("videos", str(src)), BuildConfig(out=str(out), ratios=ALL_TRAIN))
    return out


@pytest.mark.parametrize("key, stage", [
    ("videos/truncated/truncated_half", {"open", "audio", "video"}),
    ("videos/audio_only/audio_only_sound", {"video"}),
    ("videos/silent/silent_zeros", {"audio"}),
    ("videos/silent/silent_quiet", {"audio"}),
    ("videos/short/short_tiny", {"audio"}),
])  # fmt: skip
def test_bad_inputs_are_recorded(robustness, key, stage):
    assert failures(robustness)[key]["stage"] in stage


@pytest.mark.parametrize("key", [
    "videos/ok/ok_base", "videos/loop/loop_clip", "videos/vfr/vfr_clip", "videos/rotated/rotated_clip",
    "videos/rate8000/rate8000_c1", "videos/rate22050/rate22050_c2", "videos/rate44100/rate44100_c2",
    "videos/rate48000/rate48000_c1",
])  # fmt: skip
def test_awkward_inputs_work(robustness, key):
    assert key in samples(robustness)


def test_short_clip_is_looped_not_padded(robustness):
    # AAC pads its last 1024-sample frame: up to 64 ms more than was written.
    assert samples(robustness)["videos/loop/loop_clip"]["audio_seconds"] == pytest.approx(2.5, abs=0.07)


# --- array builds ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def array_source(tmp_path_factory):
    src = tmp_path_factory.mktemp("array")
    for s in range(5):
        for c in range(2):
            face_video(src / f"spk{s}" / f"c{c}.mp4", s, c, seconds=1.5)
    return src


def keys(out: Path) -> list[str]:
    return sorted(k for s in SPLITS for p in complete_shards(out / s) for k in shard_keys(p))


@pytest.mark.slow
def test_three_part_array_build_equals_a_single_build(array_source, tmp_path):
    single, array = tmp_path / "single", tmp_path / "array"
    items = source_items("videos", str(array_source))
    build_shards(items, BuildConfig(out=str(single), samples_per_shard=2))
    for part in range(3):
        build_shards(items, BuildConfig(out=str(array), samples_per_shard=2, part=part, parts=3))
    assert list((array / "train").glob("shard-p0001-*.tar"))  # shards named by task
    indexes = merge(array)
    assert keys(array) == keys(single) and len(keys(array)) == len(set(keys(array)))
    assert sum(i.num_samples for i in indexes.values()) == 10


@pytest.mark.slow
def test_killed_part_is_rerun_without_duplicates(array_source, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "shards.cli", "build", "--kind", "videos", "--source",
               str(array_source), "--out", str(out), "--samples-per-shard", "1", "--part", "0", "--parts", "2"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("*/shard-p0000-*.tar")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(command[:-4] + ["--part", "1", "--parts", "2"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    merge(out)
    built = keys(out)
    assert len(built) == len(set(built)) == 10


def test_a_portrait_beside_a_speakers_videos_is_that_speakers(tmp_path: Path):
    for name in ("alice/a1.mp4", "alice/a2.mp4", "alice/portrait.png", "bob/b1.mp4", "carol.mp4",
                 "portrait.jpg"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    portraits = {item.speaker: item.portrait for item in source_items("videos", str(tmp_path))}
    assert portraits == {"alice": tmp_path / "alice/portrait.png", "bob": None, "carol": None}
