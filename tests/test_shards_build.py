import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from shards.build import BuildConfig, BuildLocked, _part_lock, build_shards, complete_shards, shard_keys
from shards.cli import main as shards_main
from shards.schema import SPLITS, SplitIndex, decode_fc7, decode_meta, decode_wave, speaker_of
from shards.sources import source_items
from tests.video_factory import video_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return video_folder(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def built(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "out"
    code = shards_main(["build", "--kind", "videos", "--source", str(videos), "--out", str(out),
                        "--samples-per-shard", "3", "--ratios", "0.6,0.2,0.2"])
    assert code == 0
    return out


def all_keys(out: Path) -> dict[str, list[str]]:
    return {s: [k for p in complete_shards(out / s) for k in shard_keys(p)] for s in SPLITS}


def test_samples_decode_to_the_schema(built):
    samples = 0
    for split in SPLITS:
        index = SplitIndex.read(built / split)
        assert index.teacher == "dlib" and index.payload == "audio"
        for sample in wds.WebDataset([str(p) for p in complete_shards(built / split)], shardshuffle=False):
            key = sample["__key__"]
            assert decode_wave(key, sample["wav.flac"]).shape == (96_000,)
            assert decode_fc7(key, sample["fc7.npy"], index.feature_dim).shape == (128,)
            meta = decode_meta(key, sample["json"])
            assert meta["speaker"] == speaker_of(key) and meta["teacher"] == "dlib"
            assert sample["face.jpg"][:2] == b"\xff\xd8"
            samples += 1
        assert index.num_samples == sum(s["samples"] for s in index.shards)
    assert samples == 12 + 1  # 6 speakers x 2 clips, and the chosen face of the two-face clip
    assert (built / "teacher_head.pt").is_file()


def test_bad_files_are_recorded_with_their_stage(built):
    failures = {}
    for split in SPLITS:
        for line in (built / split / "failures.jsonl").read_text().splitlines():
            record = json.loads(line)
            failures[record["item"]] = record
    assert failures["videos/broken/broken_corrupt"]["stage"] == "open"
    assert failures["videos/silent/silent_no_audio"]["stage"] == "audio"
    assert failures["videos/noface/noface_wall"]["stage"] == "face"
    assert len(failures) == 3


def test_two_faces_pick_the_largest_and_say_so(built):
    for split in SPLITS:
        for sample in wds.WebDataset([str(p) for p in complete_shards(built / split)], shardshuffle=False):
            if sample["__key__"] == "videos/pair/pair_two":
                assert json.loads(sample["json"])["faces_found"] == 2
                return
    raise AssertionError("the two-face clip is missing")


def test_inspect_reports_counts_and_failures(built, capsys):
    shards_main(["inspect", str(built)])
    text = capsys.readouterr().out
    assert "train" in text and "failures by stage" in text
    assert "open" in text and "audio" in text and "face" in text


def test_splits_are_speaker_disjoint(built):
    speakers = {s: {speaker_of(k) for k in keys} for s, keys in all_keys(built).items()}
    assert not speakers["train"] & speakers["val"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["val"] & speakers["test"]


def test_rerun_skips_everything_and_changes_nothing(built, videos):
    before = {p: p.stat().st_mtime_ns for s in SPLITS for p in complete_shards(built / s)}
    summary = build_shards(source_items("videos", str(videos)),
                           BuildConfig(out=str(built), samples_per_shard=3, ratios=(0.6, 0.2, 0.2)))
    assert summary.skipped == 13 and sum(summary.written.values()) == 0
    after = {p: p.stat().st_mtime_ns for s in SPLITS for p in complete_shards(built / s)}
    assert before == after


def test_other_settings_are_refused(built, videos):
    with pytest.raises(ValueError, match="payload"):
        build_shards(source_items("videos", str(videos)),
                     BuildConfig(out=str(built), payload="spectrogram", samples_per_shard=3,
                                 ratios=(0.6, 0.2, 0.2)))


def test_spectrogram_payload(videos, tmp_path):
    out = tmp_path / "spec"
    build_shards(source_items("videos", str(videos / "spk00")),
                 BuildConfig(out=str(out), payload="spectrogram", ratios=(1.0, 0.0, 0.0)))
    sample = next(iter(wds.WebDataset([str(p) for p in complete_shards(out / "train")])))
    spec = np.load(__import__("io").BytesIO(sample["spec.npy"]))
    assert spec.shape == (2, 598, 257) and spec.dtype == np.float16
    assert "wav.flac" not in sample


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_keys(built, videos, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "shards.cli", "build", "--kind", "videos", "--source",
               str(videos), "--out", str(out), "--samples-per-shard", "2", "--ratios", "0.6,0.2,0.2"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("*/shard-*.tar")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "train" / "index.json").exists()  # it really was cut short
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed, reference = all_keys(out), all_keys(built)
    for split in SPLITS:
        assert sorted(resumed[split]) == sorted(reference[split])
        assert len(resumed[split]) == len(set(resumed[split]))  # no duplicates
    assert not list(out.glob("*/.*.tmp"))


@pytest.mark.slow
def test_parallel_workers_write_the_same_shards(built, videos, tmp_path):
    out = tmp_path / "parallel"
    build_shards(source_items("videos", str(videos)),
                 BuildConfig(out=str(out), samples_per_shard=3, ratios=(0.6, 0.2, 0.2), workers=2))
    assert all_keys(out) == all_keys(built)  # item order is kept, so shard contents match


def test_a_second_builder_of_the_same_part_is_refused(videos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = BuildConfig(out=str(out), samples_per_shard=3)
    with _part_lock(out, config):  # as a running builder holds it
        with pytest.raises(BuildLocked, match="another `s2f shards build` is writing this part"):
            build_shards(source_items("videos", str(videos)), config)
    assert not list(out.rglob("*.tar*"))  # the refused builder touched no shard
    # Parts of an array build lock separately: they run side by side.
    parts = [BuildConfig(out=str(out), parts=2, part=k) for k in range(2)]
    with _part_lock(out, parts[0]), _part_lock(out, parts[1]):
        pass
