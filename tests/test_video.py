"""Video stage: decode segments and write mp4 clips, on files the tests write."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import correlate

pytest.importorskip("av", reason="PyAV is the video extra: pip install 's2f[video]'")

from s2f.audio import load_audio  # noqa: E402
from s2f.video import (  # noqa: E402
    VideoDecodeError,
    decode_audio,
    read_segment,
    samples_to_float,
    upright,
    write_mp4,
)

FPS = 25
HEIGHT, WIDTH = 64, 128  # index frames: a red band on top, 8 bars below spelling the index
BITS = 8
BAND = 16  # rows of the red band


def index_frame(index: int) -> np.ndarray:
    """(H, W, 3) frame whose bars read `index` in binary, most significant bit on the left."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[:BAND, :, 0] = 255
    bar = WIDTH // BITS
    for bit in range(BITS):
        if index >> (BITS - 1 - bit) & 1:
            frame[BAND:, bit * bar : (bit + 1) * bar] = 255
    return frame


def read_index(frame: np.ndarray) -> int:
    """Inverse of `index_frame`, from the centre of each bar (codec edges blur)."""
    assert frame.shape == (HEIGHT, WIDTH, 3), frame.shape
    assert frame[2 : BAND - 2, :, 0].mean() > 200 and frame[2 : BAND - 2, :, 1].mean() < 60
    bar = WIDTH // BITS
    bars = [frame[BAND + 4 :, bit * bar + 4 : (bit + 1) * bar - 4] for bit in range(BITS)]
    return int("".join("1" if b.mean() > 128 else "0" for b in bars), 2)


def chirp(seconds: float, rate: int, low: float = 200.0, high: float = 3000.0) -> np.ndarray:
    """(N,) linear chirp: any time shift of even one sample lowers its correlation visibly."""
    t = np.arange(round(seconds * rate)) / rate
    sweep = (high - low) / seconds
    return (0.5 * np.sin(2 * np.pi * (low * t + 0.5 * sweep * t**2))).astype(np.float32)


def aligned_correlation(reference: np.ndarray, decoded: np.ndarray, max_lag: int = 4096) -> float:
    """Pearson correlation of two signals after the lag that best aligns them (within max_lag)."""
    probe = reference[: len(reference) // 2]
    scores = correlate(decoded[: len(reference) + max_lag], probe, "full")
    lag = int(np.argmax(scores)) - (len(probe) - 1)
    assert abs(lag) <= max_lag, lag
    length = min(len(reference), len(decoded) - lag) - max(0, -lag)
    ref = reference[max(0, -lag) : max(0, -lag) + length]
    dec = decoded[max(0, lag) : max(0, lag) + length]
    return float(np.corrcoef(ref, dec)[0, 1])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def video_display_matrix(path: Path) -> tuple[int, int, int, int]:
    """(a, b, c, d) of the video track's tkhd matrix, 16.16 fixed point (QuickTime spec)."""
    data = path.read_bytes()
    at = data.find(b"tkhd")
    while at >= 0:
        version = data[at + 4]
        matrix_at = at + 4 + (40 if version == 0 else 52)  # after times, ids, layer, volume
        a, b, _, c, d = struct.unpack(">5i", data[matrix_at : matrix_at + 20])
        width = struct.unpack(">I", data[matrix_at + 36 : matrix_at + 40])[0]
        if width:  # audio tracks have no width
            return a, b, c, d
        at = data.find(b"tkhd", at + 4)
    raise AssertionError(f"{path}: no video tkhd box")


@pytest.fixture(scope="module")
def indexed_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """4 s at 25 fps of index frames with a 16 kHz chirp: (path, audio (N,))."""
    path = tmp_path_factory.mktemp("video") / "indexed.mp4"
    audio = chirp(4.0, 16_000)
    frames = np.stack([index_frame(i) for i in range(4 * FPS)])  # (T, H, W, 3)
    write_mp4(path, frames, FPS, audio, 16_000)
    return path, audio


def test_samples_to_float_golden() -> None:
    packed = np.array([[1000, -1000, 32767, -32768]], np.int16)  # (1, n * C) interleaved
    expected = np.array([[1000, 32767], [-1000, -32768]], np.float32) / 32768
    np.testing.assert_array_equal(samples_to_float(packed, "s16", channels=2), expected)
    planar = np.array([[0, 128, 255]], np.uint8)
    np.testing.assert_array_equal(samples_to_float(planar, "u8p", 1), [[-1.0, 0.0, 127 / 128]])
    floats = np.array([[0.25, -0.5]], np.float32)
    np.testing.assert_array_equal(samples_to_float(floats, "fltp", 1), floats)
    with pytest.raises(ValueError, match="sample format"):
        samples_to_float(floats, "weird", 1)


def test_upright_turns_counter_clockwise() -> None:
    image = np.array([[1, 2, 3], [4, 5, 6]])[:, :, None]  # (H=2, W=3, 1)
    np.testing.assert_array_equal(upright(image, 90)[:, :, 0], [[3, 6], [2, 5], [1, 4]])
    np.testing.assert_array_equal(upright(image, -90)[:, :, 0], [[4, 1], [5, 2], [6, 3]])
    np.testing.assert_array_equal(upright(image, 180)[:, :, 0], [[6, 5, 4], [3, 2, 1]])


def test_frames_round_trip_psnr(tmp_path: Path) -> None:
    y, x = np.mgrid[:96, :160] / np.array([96.0, 160.0])[:, None, None]
    base = np.stack([200 * x, 200 * y, 127 + 100 * np.sin(2 * np.pi * (x + y))], axis=-1)
    frames = np.stack([np.roll(base, 4 * i, axis=1) for i in range(10)]).astype(np.uint8)
    path = write_mp4(tmp_path / "smooth.mp4", frames, FPS)
    segment = read_segment(path, frame_times=(0.0, 0.2), with_audio=False)
    assert segment.audio is None and segment.fps == FPS
    assert segment.frame_times == pytest.approx([0.0, 0.2])
    assert psnr(segment.frames[0], frames[0]) > 30
    assert psnr(segment.frames[1], frames[5]) > 30
    assert segment.frames[1].dtype == np.uint8 and segment.frames[1].shape == (96, 160, 3)


@pytest.mark.parametrize(("rate", "channels"), [(16_000, 1), (44_100, 1), (48_000, 2)])
def test_audio_round_trip(tmp_path: Path, rate: int, channels: int) -> None:
    audio = np.stack([chirp(2.0, rate, low=200 + 300 * c) for c in range(channels)])  # (C, N)
    path = write_mp4(tmp_path / "tone.m4a", None, FPS, audio, rate)
    decoded, decoded_rate = decode_audio(path)
    assert decoded_rate == rate and decoded.shape[0] == channels and decoded.dtype == np.float32
    assert abs(decoded.shape[1] - audio.shape[1]) < 2048
    for c in range(channels):  # per channel, so swapped channels fail
        assert aligned_correlation(audio[c], decoded[c]) > 0.99


def test_read_segment_seeks_to_start(indexed_clip: tuple[Path, np.ndarray]) -> None:
    path, audio = indexed_clip
    segment = read_segment(path, start=2.0, end=3.0, frame_times=(0.0, 0.5, 1.5, 0.02))
    # 2.5 s falls between frames 62 (2.48 s) and 63 (2.52 s): frame 62 is on screen
    assert [read_index(frame) for frame in segment.frames] == [50, 62, 87, 50]
    assert segment.frame_times == pytest.approx([2.0, 2.48, 3.48, 2.0])
    assert segment.sample_rate == 16_000 and segment.audio.shape == (1, 16_000)
    # no alignment search: the samples must be those of [2.0 s, 3.0 s) exactly
    assert np.corrcoef(segment.audio[0], audio[32_000:48_000])[0, 1] > 0.99
    assert segment.duration == pytest.approx(4.0, abs=0.05) and segment.fps == FPS


def test_read_segment_to_end_and_out_of_order_times(indexed_clip: tuple[Path, np.ndarray]) -> None:
    path, audio = indexed_clip
    segment = read_segment(path, start=3.0, frame_times=(0.96, -3.0, 0.0))
    assert [read_index(frame) for frame in segment.frames] == [99, 0, 75]
    assert abs(segment.audio.shape[1] - 16_000) < 1024
    assert np.corrcoef(segment.audio[0, :15_000], audio[48_000:63_000])[0, 1] > 0.99


def test_variable_frame_rate(tmp_path: Path) -> None:
    shown = np.array([0.0, 0.1, 0.15, 0.5, 0.55, 1.2, 1.3, 2.0])
    frames = np.stack([index_frame(i) for i in range(len(shown))])
    path = write_mp4(tmp_path / "vfr.mp4", frames, fps=10, frame_times=list(shown))
    asked = [0.0, 0.12, 0.16, 0.49, 0.5, 1.0, 1.25, 1.9, 2.0]
    segment = read_segment(path, frame_times=asked, with_audio=False)
    expected = np.searchsorted(shown, asked, side="right") - 1
    assert [read_index(frame) for frame in segment.frames] == expected.tolist()
    assert segment.frame_times == pytest.approx(shown[expected].tolist())


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_comes_out_upright(tmp_path: Path, rotation: int) -> None:
    # a camera turned by `rotation` stores the scene turned the other way, and tags the file
    # so that players turn it back clockwise by `rotation`
    stored = np.stack([np.rot90(index_frame(i), k=rotation // 90) for i in range(3)])
    path = write_mp4(tmp_path / "phone.mp4", stored, FPS, rotation_deg=rotation)
    segment = read_segment(path, frame_times=(0.0, 0.08), with_audio=False)
    assert [read_index(frame) for frame in segment.frames] == [0, 2]


def test_rotation_is_the_quicktime_clockwise_matrix(tmp_path: Path) -> None:
    # Phones tag a portrait recording with the matrix of a 90 degree clockwise turn:
    # a=0, b=1, c=-1, d=0 in 16.16 fixed point (the `rotate=90` of older tools).
    stored = np.stack([np.rot90(index_frame(1))] * 2)
    path = write_mp4(tmp_path / "portrait.mp4", stored, FPS, rotation_deg=90)
    assert video_display_matrix(path) == (0, 1 << 16, -(1 << 16), 0)
    plain = write_mp4(tmp_path / "plain.mp4", stored, FPS)
    assert video_display_matrix(plain) == (1 << 16, 0, 0, 1 << 16)


def test_no_audio_track(tmp_path: Path) -> None:
    path = write_mp4(tmp_path / "silent.mp4", np.stack([index_frame(7)] * 5), FPS)
    with pytest.raises(VideoDecodeError, match="no audio stream") as error:
        read_segment(path)
    assert error.value.stage == "audio"
    with pytest.raises(VideoDecodeError) as error:
        decode_audio(path)
    assert error.value.stage == "audio"
    assert read_index(read_segment(path, with_audio=False).frames[0]) == 7


def test_audio_only_file(tmp_path: Path) -> None:
    audio = chirp(1.0, 16_000)
    path = write_mp4(tmp_path / "voice.m4a", None, FPS, audio, 16_000)
    with pytest.raises(VideoDecodeError, match="no video stream") as error:
        read_segment(path)
    assert error.value.stage == "video"
    segment = read_segment(path, start=0.25, end=0.75, frame_times=())
    assert segment.frames == [] and segment.audio.shape == (1, 8000)
    assert np.corrcoef(segment.audio[0], audio[4000:12_000])[0, 1] > 0.99
    decoded, rate = decode_audio(path)
    assert rate == 16_000 and aligned_correlation(audio, decoded[0]) > 0.99


def test_truncated_file_raises(indexed_clip: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    data = indexed_clip[0].read_bytes()
    half = tmp_path / "half.mp4"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError):
        read_segment(half)
    with pytest.raises(VideoDecodeError) as error:
        read_segment(half, start=3.0, frame_times=(0.5,), with_audio=False)
    assert error.value.stage == "video"
    with pytest.raises(VideoDecodeError):
        decode_audio(half)
    # what is there still decodes
    assert read_index(read_segment(half, with_audio=False).frames[0]) == 0
    header = tmp_path / "header.mp4"
    for cut in (200, 2000):  # before and inside the track list
        header.write_bytes(data[:cut])
        with pytest.raises(VideoDecodeError) as error:
            read_segment(header)
        assert error.value.stage == "open"


def test_random_bytes_and_missing_file_raise(tmp_path: Path) -> None:
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).bytes(50_000))
    for read in (read_segment, decode_audio):
        with pytest.raises(VideoDecodeError) as error:
            read(noise)
        assert error.value.stage == "open" and str(noise) in str(error.value)
    with pytest.raises(VideoDecodeError, match="no such file") as error:
        read_segment(tmp_path / "absent.mp4")
    assert error.value.stage == "open"


def test_frame_past_the_end_raises(indexed_clip: tuple[Path, np.ndarray]) -> None:
    with pytest.raises(VideoDecodeError, match="ends at") as error:
        read_segment(indexed_clip[0], frame_times=(5.0,), with_audio=False)
    assert error.value.stage == "video"


@pytest.mark.parametrize("suffix", [".m4a", ".mp4"])
def test_load_audio_falls_back_to_av(tmp_path: Path, suffix: str) -> None:
    rate, seconds = 44_100, 1.5
    t = np.arange(round(seconds * rate)) / rate
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.4 * np.sin(2 * np.pi * 1250 * t)])
    frames = None if suffix == ".m4a" else np.stack([index_frame(3)] * round(seconds * FPS))
    path = write_mp4(tmp_path / f"clip{suffix}", frames, FPS, stereo.astype(np.float32), rate)
    wave = load_audio(path).numpy()
    assert wave.ndim == 1 and abs(len(wave) - seconds * 16_000) < 1024
    t16 = np.arange(round(seconds * 16_000)) / 16_000
    mono = 0.2 * (np.sin(2 * np.pi * 440 * t16) + np.sin(2 * np.pi * 1250 * t16))
    assert aligned_correlation(mono, wave) > 0.99


def test_write_is_atomic(tmp_path: Path) -> None:
    odd = np.zeros((3, 63, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="even height and width"):
        write_mp4(tmp_path / "odd.mp4", odd, FPS)
    mixed = [index_frame(0), np.zeros((32, 32, 3), np.uint8)]
    with pytest.raises(ValueError, match="share one shape"):
        write_mp4(tmp_path / "mixed.mp4", mixed, FPS)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind
    write_mp4(tmp_path / "ok.mp4", iter([index_frame(1), index_frame(2)]), FPS)
    assert [p.name for p in tmp_path.iterdir()] == ["ok.mp4"]
