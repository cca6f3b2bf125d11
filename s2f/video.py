"""Video stage: decode a segment of a video file (audio track + frames) and write mp4 clips.

Decoding reads only what a segment needs: the audio is sought to just before `start` and
trimmed by presentation time; each requested frame is reached by seeking to the keyframe at
or before it and decoding forward to the frame that covers the time (the one on screen then),
so variable frame rate files give the right frame. Frames come out upright: the display
matrix (or an old `rotate` tag) that phones write is applied. Times are seconds from the
container's start, as a player shows them.

Writing makes H.264 (yuv420p) + AAC mp4 files through a temporary name, so a reader never sees
half a file. PyAV is an optional extra: pip install 's2f[video]'.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

AUDIO_PREROLL_S = 0.2  # s decoded before `start`, so overlapped codec frames (AAC, MP3) settle
SEEK_GAP_S = 2.0  # s; a later frame this close is reached by decoding on, a farther one by seeking
TIME_TOLERANCE_S = 1e-4  # s of float error allowed when comparing a frame's pts with a time
TRUNCATION_TOLERANCE_S = 0.5  # s a stream may stop short of its declared end and still count whole
VIDEO_CLOCK_HZ = 90_000  # Hz clock of written video pts (MPEG's; exact for 25 and 30000/1001 fps)
KEYFRAME_INTERVAL_S = 1.0  # s between written keyframes: bounds the decoding a seek costs
X264_OPTIONS = {"preset": "superfast", "crf": "18"}  # near-transparent; ~25% faster than veryfast
AAC_OPTIONS = {"aac_coder": "fast"}  # half the default coder's time, no audible loss at this rate
AUDIO_BIT_RATE_PER_CHANNEL = 96_000  # bit/s of AAC per channel
FLOAT_SCALE = {"u8": 128.0, "s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63, "flt": 1.0, "dbl": 1.0}
INSTALL_HINT = "install the video extra: pip install 's2f[video]'"


class VideoDecodeError(ValueError):
    """A video file could not be decoded; `stage` is "open", "audio" or "video"."""

    def __init__(self, path: str | Path, stage: str, reason: str) -> None:
        super().__init__(f"{path}: {stage} failed: {reason}")
        self.path = str(path)
        self.stage = stage
        self.reason = reason


@dataclass
class Segment:
    """What `read_segment` decoded from one file."""

    audio: np.ndarray | None  # (C, N) float32 in [-1, 1], samples of [start, end)
    sample_rate: int | None  # Hz of `audio`
    frames: list[np.ndarray] = field(default_factory=list)  # each (H, W, 3) uint8 RGB, upright
    frame_times: list[float] = field(default_factory=list)  # s, the pts of each returned frame
    duration: float | None = None  # s, the container's duration
    fps: float | None = None  # average frame rate of the video stream


def _import_av() -> Any:
    try:
        import av
    except ImportError as error:
        raise ImportError(f"PyAV is needed to read and write video; {INSTALL_HINT}") from error
    return av


def samples_to_float(array: np.ndarray, format_name: str, channels: int) -> np.ndarray:
    """Decoded audio samples as (C, n) float32 in [-1, 1].

    `array` is what `AudioFrame.to_ndarray()` gives: (C, n) for planar formats (name ends in
    "p"), (1, n * C) interleaved otherwise. Integer formats are scaled by their full range.
    """
    planar = format_name.endswith("p")
    base = format_name[:-1] if planar else format_name
    if base not in FLOAT_SCALE:
        raise ValueError(
            f"unknown audio sample format {format_name!r}; expected one of {list(FLOAT_SCALE)}"
        )
    if not planar:
        array = array.reshape(-1, channels).T  # (C, n)
    values = array.astype(np.float32)
    if base == "u8":
        values -= FLOAT_SCALE["u8"]  # unsigned 8-bit is centred on 128
    return values / np.float32(FLOAT_SCALE[base])


def upright(image: np.ndarray, rotation_ccw: float) -> np.ndarray:
    """Turn a stored (H, W, 3) frame counter-clockwise by `rotation_ccw` degrees (rounded to 90)."""
    quarter_turns = round(rotation_ccw / 90.0) % 4
    return np.ascontiguousarray(np.rot90(image, k=quarter_turns))


def _rotation_ccw(frame: Any, stream: Any) -> float:
    """Counter-clockwise degrees that show `frame` upright: display matrix, else `rotate` tag."""
    if frame.rotation:
        return float(frame.rotation)
    # The old tag counts clockwise degrees a player turns the picture.
    return -float(stream.metadata.get("rotate", 0) or 0)


def _open(av: Any, path: Path) -> Any:
    if not path.is_file():
        raise VideoDecodeError(path, "open", "no such file; check the path")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        reason = f"not a readable media file ({error}); re-download or re-encode it"
        raise VideoDecodeError(path, "open", reason) from error
    if not (container.streams.audio or container.streams.video):  # an empty or cut-short file
        container.close()
        raise VideoDecodeError(path, "open", "no audio or video streams; re-download the file")
    return container


def _origin(container: Any) -> float:
    """Seconds of the container's first timestamp: times given by callers count from it."""
    return container.start_time / 1e6 if container.start_time is not None else 0.0


def _declared_end(container: Any, stream: Any) -> float | None:
    """Seconds at which `stream` claims to end, in the stream's own clock."""
    if stream.duration is not None and stream.time_base is not None:
        start = stream.start_time or 0
        return float((start + stream.duration) * stream.time_base)
    if container.duration is not None:
        return _origin(container) + container.duration / 1e6
    return None


def _first_stream(path: Path, container: Any, kind: str) -> Any:
    streams = getattr(container.streams, kind)
    if not streams:
        raise VideoDecodeError(path, kind, f"the file has no {kind} stream")
    stream = streams[0]
    if stream.time_base is None:
        raise VideoDecodeError(path, kind, f"the {kind} stream has no time base; re-mux the file")
    return stream


def _audio_chunks(container: Any, stream: Any) -> Iterator[tuple[float, np.ndarray, int]]:
    """(start time in s, samples (C, n) float32, rate in Hz) of each decoded audio frame."""
    for frame in container.decode(stream):
        samples = samples_to_float(frame.to_ndarray(), frame.format.name, frame.layout.nb_channels)
        time = frame.time if frame.time is not None else 0.0
        yield time, samples, frame.sample_rate


def _decode_audio_range(
    path: Path, container: Any, stream: Any, start: float | None, end: float | None
) -> tuple[np.ndarray, int]:
    """Samples (C, N) of [start, end) in the stream's clock; `start=None` keeps all from the first.

    Seeks when `start` lies past the preroll, then trims by the first decoded frame's pts.
    """
    if start is not None and start - AUDIO_PREROLL_S > 0:
        offset = int((start - AUDIO_PREROLL_S) / stream.time_base)
        container.seek(offset, stream=stream)  # lands at or before the offset
    chunks, first_time, rate = [], 0.0, 0
    for time, samples, rate in _audio_chunks(container, stream):
        first_time = time if not chunks else first_time
        if end is not None and time >= end:
            break
        chunks.append(samples)
    if not chunks:
        where = "in the file" if start is None else f"at or after {start:.3f} s"
        raise VideoDecodeError(path, "audio", f"no audio samples {where}; check the segment times")
    audio = np.concatenate(chunks, axis=1)  # (C, N) from first_time on
    if start is None:
        return audio, rate
    offset = round((start - first_time) * rate)
    if offset < 0:  # the stream starts after `start`: silence keeps sample i at start + i / rate
        audio = np.pad(audio, ((0, 0), (-offset, 0)))
        offset = 0
    stop = None if end is None else offset + round((end - start) * rate)
    return audio[:, offset:stop], rate


def _check_complete(
    path: Path, stage: str, reached: float, declared: float | None, wanted: float | None
) -> None:
    """Raise when a stream stopped well before its declared end and before the time asked for."""
    if declared is None:
        return
    limit = declared if wanted is None else min(wanted, declared)
    if reached < limit - TRUNCATION_TOLERANCE_S:
        reason = f"data stops at {reached:.2f} s of a declared {declared:.2f} s"
        raise VideoDecodeError(path, stage, reason + "; the file is cut short, re-download it")


def _frame_time(path: Path, frame: Any) -> float:
    if frame.time is None:
        reason = "decoded frames carry no timestamps; re-mux the stream into mp4"
        raise VideoDecodeError(path, "video", reason)
    return frame.time


def _frame_end(frame: Any) -> float:
    """Seconds at which `frame` stops being shown (its pts when the duration is unknown)."""
    return frame.time + (float(frame.duration * frame.time_base) if frame.duration else 0.0)


def _check_past_end(path: Path, time: float, shown_until: float, declared: float | None) -> None:
    """Raise when `time` lies after the last decoded frame and after the video's declared end."""
    if time <= shown_until + TIME_TOLERANCE_S:
        return
    _check_complete(path, "video", shown_until, declared, time)
    if declared is None or time > declared + TIME_TOLERANCE_S:
        end = max(shown_until, declared or 0.0)
        reason = f"no frame at {time:.3f} s: the video ends at {end:.3f} s"
        raise VideoDecodeError(path, "video", reason)


def _fps(container: Any) -> float | None:
    if not container.streams.video or not container.streams.video[0].average_rate:
        return None
    return float(container.streams.video[0].average_rate)


def _duration(container: Any) -> float | None:
    return container.duration / 1e6 if container.duration is not None else None


def _broken(path: Path, stage: str, error: Exception) -> VideoDecodeError:
    return VideoDecodeError(path, stage, f"decoding broke ({error}); re-encode the file")


def decode_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """All of the first audio stream of any container PyAV reads: ((C, N) float32, rate in Hz)."""
    av, path = _import_av(), Path(path)
    with _open(av, path) as container:
        stream = _first_stream(path, container, "audio")
        try:
            audio, rate = _decode_audio_range(path, container, stream, start=None, end=None)
        except av.FFmpegError as error:
            raise _broken(path, "audio", error) from error
        reached = float((stream.start_time or 0) * stream.time_base) + audio.shape[1] / rate
        _check_complete(path, "audio", reached, _declared_end(container, stream), None)
    return audio, rate


def _read_audio(
    av: Any, path: Path, container: Any, start: float, end: float | None
) -> tuple[np.ndarray, int]:
    """Audio of [start, end) in the stream's clock; raises when the file is cut before `end`."""
    stream = _first_stream(path, container, "audio")
    try:
        audio, rate = _decode_audio_range(path, container, stream, start, end)
    except av.FFmpegError as error:
        raise _broken(path, "audio", error) from error
    reached = start + audio.shape[1] / rate
    _check_complete(path, "audio", reached, _declared_end(container, stream), end)
    return audio, rate


def _read_frames(
    av: Any, path: Path, container: Any, times: Sequence[float]
) -> list[tuple[float, np.ndarray]]:
    """(pts in s, upright (H, W, 3) uint8 RGB) of the frame covering each of `times`, in order."""
    stream = _first_stream(path, container, "video")
    stream.thread_type = "AUTO"
    cursor = _FrameCursor(path, container, stream)
    declared = _declared_end(container, stream)
    found: dict[float, tuple[float, np.ndarray]] = {}
    try:
        for time in sorted(set(times)):
            frame = cursor.frame_at(time)
            if cursor.upcoming is None:  # the last frame: is `time` still within the video?
                _check_past_end(path, time, _frame_end(frame), declared)
            image = upright(frame.to_ndarray(format="rgb24"), _rotation_ccw(frame, stream))
            found[time] = (frame.time, image)
    except av.FFmpegError as error:
        raise _broken(path, "video", error) from error
    return [found[time] for time in times]


def read_segment(
    path: str | Path,
    start: float = 0.0,
    end: float | None = None,
    frame_times: Sequence[float] = (0.0,),
    with_audio: bool = True,
) -> Segment:
    """Decode the audio of [start, end) and the frames on screen at `start + t`, t in `frame_times`.

    `end=None` reads the audio to the end of the stream. Audio is (C, N) float32 at the file's
    own rate. Frames are upright (H, W, 3) uint8 RGB. Raises `VideoDecodeError` with `stage`
    "open" (unreadable file), "audio" (no, broken or cut audio; `with_audio=False` skips it) or
    "video" (no, broken or cut video when frames are asked for; `frame_times=()` skips them).
    """
    av, path = _import_av(), Path(path)
    if end is not None and end <= start:
        raise ValueError(f"read_segment({path}): end {end} s must be after start {start} s")
    with _open(av, path) as container:
        origin = _origin(container)
        audio, rate, frames = None, None, []
        if with_audio:
            stop = None if end is None else origin + end
            audio, rate = _read_audio(av, path, container, origin + start, stop)
        if frame_times:
            frames = _read_frames(av, path, container, [origin + start + t for t in frame_times])
        return Segment(
            audio=audio,
            sample_rate=rate,
            frames=[image for _, image in frames],
            frame_times=[time - origin for time, _ in frames],
            duration=_duration(container),
            fps=_fps(container),
        )


def _check_frame(frame: np.ndarray, shape: tuple[int, ...] | None) -> None:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(
            f"write_mp4: frames must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}"
        )
    if frame.shape[0] % 2 or frame.shape[1] % 2:
        raise ValueError(
            f"write_mp4: H.264 yuv420p needs an even height and width, got {frame.shape[:2]}; "
            "crop or pad the frames"
        )
    if shape is not None and frame.shape != shape:
        raise ValueError(
            f"write_mp4: all frames must share one shape, got {frame.shape} after {shape}"
        )


def _as_channels(audio: np.ndarray) -> np.ndarray:
    """(C, N) or (N,) samples as contiguous (C, N) float32 clipped to [-1, 1]."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None, :]  # (1, N)
    if audio.ndim != 2 or audio.shape[0] > audio.shape[1]:
        raise ValueError(f"write_mp4: audio must be (C, N) or (N,) with C < N, got {audio.shape}")
    return np.ascontiguousarray(np.clip(audio, -1.0, 1.0))


def _add_video_stream(
    container: Any, shape: tuple[int, ...], fps: float, codec: str, rotation_deg: int
) -> Any:
    rate = Fraction(fps).limit_denominator(100_000)
    options = X264_OPTIONS if codec == "libx264" else {}
    stream = container.add_stream(codec, rate=rate, options=options)
    stream.height, stream.width, stream.pix_fmt = shape[0], shape[1], "yuv420p"
    stream.codec_context.time_base = Fraction(1, VIDEO_CLOCK_HZ)
    stream.gop_size = max(1, round(KEYFRAME_INTERVAL_S * fps))
    if rotation_deg:
        stream.set_display_rotation(-rotation_deg)  # PyAV counts counter-clockwise
    return stream


def _add_audio_stream(container: Any, channels: int, sample_rate: int, codec: str) -> Any:
    options = AAC_OPTIONS if codec == "aac" else {}
    layout = f"{channels}c"  # FFmpeg's default layout for that many channels
    stream = container.add_stream(codec, rate=sample_rate, layout=layout, options=options)
    stream.bit_rate = AUDIO_BIT_RATE_PER_CHANNEL * channels
    return stream


def write_mp4(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray] | None,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16_000,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    rotation_deg: int = 0,
    frame_times: Sequence[float] | None = None,
) -> Path:
    """Write frames (T, H, W, 3) uint8 RGB and audio (C, N) or (N,) float32 as an H.264 + AAC mp4.

    `frame_times` (s) gives each frame's presentation time for variable frame rate; by default
    frame i is shown at i / fps. `rotation_deg` is the clockwise turn a player applies to show
    the frames (a phone's portrait recording stores 90). `frames=None` writes audio only (m4a).
    The file appears at `path` only once complete.
    """
    av, path = _import_av(), Path(path)
    images = iter(() if frames is None else frames)  # a (T, H, W, 3) array yields its frames
    first = next(images, None)
    if first is None and audio is None:
        raise ValueError(f"write_mp4({path}): nothing to write; give frames, audio or both")
    if first is not None:
        _check_frame(first, None)
    samples = None if audio is None else _as_channels(audio)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # faststart puts the index first: a cut file still opens and its head still decodes
        with av.open(str(temporary), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            video = None
            if first is not None:
                video = _add_video_stream(out, first.shape, fps, video_codec, rotation_deg)
                images = itertools.chain([first], images)
            muxer = _Muxer(av, out, video, samples, sample_rate, audio_codec)
            muxer.write_video(images, fps, frame_times)
            muxer.finish()
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


class _FrameCursor:
    """Decodes one video stream forward, seeking only for a time behind it or far ahead of it."""

    def __init__(self, path: Path, container: Any, stream: Any) -> None:
        self.path = path
        self.container = container
        self.stream = stream
        self.frames: Iterator[Any] | None = None
        self.current: Any = None  # last decoded frame at or before the last time asked
        self.upcoming: Any = None  # the decoded frame after `current`, None at the end

    def _seek(self, time: float | None) -> None:
        """Seek to the keyframe at or before `time` s (None: the stream's start), decode a frame."""
        first = self.stream.start_time or 0
        offset = first if time is None else max(int(time / self.stream.time_base), first)
        self.container.seek(offset, stream=self.stream)
        self.frames = self.container.decode(self.stream)
        self.current, self.upcoming = None, next(self.frames, None)

    def _must_seek(self, time: float) -> bool:
        position = self.current if self.current is not None else self.upcoming
        if self.frames is None or position is None:
            return True
        position_time = _frame_time(self.path, position)
        return time < position_time - TIME_TOLERANCE_S or time > position_time + SEEK_GAP_S

    def frame_at(self, time: float) -> Any:
        """The frame on screen at `time` s; the first frame when `time` precedes the stream."""
        if self._must_seek(time):
            self._seek(time)
            if self.upcoming is not None and not self._shown_by(self.upcoming, time):
                self._seek(None)  # the index put the keyframe late: decode from the start
        while self.upcoming is not None and self._shown_by(self.upcoming, time):
            self.current, self.upcoming = self.upcoming, next(self.frames, None)
        frame = self.current if self.current is not None else self.upcoming
        if frame is None:
            reason = f"no decodable frame at {time:.3f} s; the file is empty or cut short"
            raise VideoDecodeError(self.path, "video", reason)
        return frame

    def _shown_by(self, frame: Any, time: float) -> bool:
        return _frame_time(self.path, frame) <= time + TIME_TOLERANCE_S


class _Muxer:
    """Encodes video frames into an open mp4, sending the audio up to each frame's time first."""

    def __init__(
        self,
        av: Any,
        container: Any,
        video: Any,
        samples: np.ndarray | None,
        sample_rate: int,
        audio_codec: str,
    ) -> None:
        self.av = av
        self.container = container
        self.video = video  # the video stream, or None for no video track
        self.samples = samples  # (C, N) float32, or None for no audio track
        self.sample_rate = sample_rate
        self.audio = None
        if samples is not None:
            self.audio = _add_audio_stream(container, samples.shape[0], sample_rate, audio_codec)
        self.audio_done = 0  # samples already sent to the audio encoder

    def _mux(self, packets: list[Any]) -> None:
        for packet in packets:
            self.container.mux(packet)

    def _send_audio(self, stop: int) -> None:
        """Encode the samples not yet sent, up to sample `stop`."""
        if self.samples is None:
            return
        stop = min(self.samples.shape[1], stop)
        if stop <= self.audio_done:
            return
        chunk = np.ascontiguousarray(self.samples[:, self.audio_done : stop])  # (C, n)
        frame = self.av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self.audio.layout.name)
        frame.sample_rate, frame.pts = self.sample_rate, self.audio_done
        self._mux(self.audio.encode(frame))
        self.audio_done = stop

    def write_video(
        self, frames: Iterator[np.ndarray], fps: float, frame_times: Sequence[float] | None
    ) -> None:
        """Encode each (H, W, 3) frame at its time, after the audio that precedes it."""
        for index, image in enumerate(frames):
            _check_frame(image, (self.video.height, self.video.width, 3))
            if frame_times is not None and index >= len(frame_times):
                raise ValueError(
                    f"write_mp4: only {len(frame_times)} frame_times; give one time per frame"
                )
            time = index / fps if frame_times is None else frame_times[index]
            self._send_audio(round(time * self.sample_rate))
            frame = self.av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = round(time * VIDEO_CLOCK_HZ)
            self._mux(self.video.encode(frame))

    def finish(self) -> None:
        """Send the remaining audio and flush both encoders."""
        if self.video is not None:
            self._mux(self.video.encode())
        if self.samples is not None:
            self._send_audio(self.samples.shape[1])
            self._mux(self.audio.encode())
