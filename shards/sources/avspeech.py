"""The `avspeech` source: the official AVSpeech CSVs, downloaded with yt-dlp, surviving dead links.

CSV rows are `youtube_id, start, end, x, y` (no header): a segment in seconds and the speaker's
face centre (normalised x, y) at the segment start. AVSpeech has no speaker ids; a video is taken
as one speaker, so splits are disjoint by video.

Downloading (`YtDlpFetcher`, run inside the builder's workers):
- each video is fetched once: a video with one segment downloads only that section
  (`--download-sections`); a video with several downloads whole, once, and every segment is cut
  from the cached file;
- the lowest resolution that keeps a face usable (<= 360 p), remuxed to mp4;
- retries with exponential backoff; a per-host rate limit shared by all processes on the node
  (a lock file holding the time of the last request);
- a cache of downloaded files (written under a temporary name, then renamed), and `dead.jsonl`,
  a record of videos that are gone (private, removed, unavailable), which are never asked again;
- the command is a template, so tests (and mirrors) can replace yt-dlp; it needs ffmpeg on PATH
  for sections and merging.
"""

from __future__ import annotations

import csv
import fcntl
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shards.schema import sample_key
from shards.sources import SourceItem

YTDLP_FORMAT = "bv*[height<=360][ext=mp4]+ba[ext=m4a]/b[height<=360][ext=mp4]/b[height<=360]/w"
YTDLP_COMMAND = (
    "yt-dlp", "--quiet", "--no-warnings", "--no-playlist", "--no-progress",
    "--format", YTDLP_FORMAT, "--merge-output-format", "mp4", "--remux-video", "mp4",
    "--socket-timeout", "30", "--output", "{out}",
)  # fmt: skip
SECTION_ARGS = ("--download-sections", "*{start}-{end}", "--force-keyframes-at-cuts")
URL = "https://www.youtube.com/watch?v={id}"
HOST = "youtube"
# Messages after which asking again is pointless: the video is gone for everyone.
DEAD_MARKERS = (
    "video unavailable", "private video", "has been removed", "account associated",
    "no longer available", "copyright", "members-only", "this video is not available",
)  # fmt: skip
RETRIES = 3
BACKOFF_S = 2.0  # first retry waits this long, then doubles
MIN_INTERVAL_S = 1.0  # per host, across processes of one node
TIMEOUT_S = 600.0


def _fail(reason: str):
    from shards.build import ItemFailed

    return ItemFailed("download", reason)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wait_for_rate_limit(lock_file: Path, min_interval_s: float) -> None:
    """Sleep until `min_interval_s` after the previous request recorded in `lock_file`."""
    with _locked(lock_file) as handle:
        handle.seek(0)
        text = handle.read().strip()
        last = float(text) if text else 0.0
        delay = last + min_interval_s - time.time()
        if delay > 0:
            time.sleep(delay)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{time.time():.6f}")


@dataclass(frozen=True)
class YtDlpFetcher:
    """Fetches one AVSpeech item's video into `cache_dir`; see the module docstring."""

    cache_dir: str
    command: tuple[str, ...] = YTDLP_COMMAND
    retries: int = RETRIES
    backoff_s: float = BACKOFF_S
    min_interval_s: float = MIN_INTERVAL_S
    timeout_s: float = TIMEOUT_S

    @property
    def dead_file(self) -> Path:
        return Path(self.cache_dir) / "dead.jsonl"

    @staticmethod
    def cache_name(video_id: str, section: tuple[float, float] | None) -> str:
        return video_id if section is None else f"{video_id}_{section[0]:.3f}_{section[1]:.3f}"

    def command_line(self, video_id: str, out: Path, section: tuple[float, float] | None) -> list[str]:
        """The exact argv run for one download."""
        start, end = ("", "") if section is None else (f"{section[0]:.3f}", f"{section[1]:.3f}")
        fields = {"id": video_id, "out": str(out), "url": URL.format(id=video_id), "start": start, "end": end}
        argv = [part.format(**fields) for part in self.command]
        if self.command == YTDLP_COMMAND:
            if section is not None:
                argv += [part.format(**fields) for part in SECTION_ARGS]
            argv.append(fields["url"])
        return argv

    def _dead_reason(self, video_id: str) -> str | None:
        if not self.dead_file.is_file():
            return None
        for line in self.dead_file.read_text().splitlines():
            record = json.loads(line)
            if record["id"] == video_id:
                return record["reason"]
        return None

    def _record_dead(self, video_id: str, reason: str) -> None:
        with _locked(self.dead_file) as handle:
            handle.write(json.dumps({"id": video_id, "reason": reason}) + "\n")

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        wait_for_rate_limit(Path(self.cache_dir) / f".rate-{HOST}", self.min_interval_s)
        return subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)

    def _download(self, video_id: str, target: Path, section) -> None:
        tmp = target.with_name(f".{target.name}.part.mp4")
        argv = self.command_line(video_id, tmp, section)
        error = ""
        for attempt in range(self.retries + 1):
            try:
                result = self._run(argv)
            except (OSError, subprocess.TimeoutExpired) as exc:
                error = f"{argv[0]}: {exc}"
            else:
                if result.returncode == 0 and tmp.is_file() and tmp.stat().st_size > 0:
                    tmp.replace(target)
                    return
                error = (result.stderr or result.stdout or f"exit {result.returncode}").strip()[-500:]
                if any(marker in error.lower() for marker in DEAD_MARKERS):
                    self._record_dead(video_id, error)
                    raise _fail(f"video {video_id} is gone: {error}")
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise _fail(f"video {video_id}: download failed after {self.retries + 1} tries: {error}")

    def fetch(self, item: SourceItem) -> tuple[Path, float]:
        video_id = item.meta["youtube_id"]
        section = None if item.meta["whole_video"] else (item.start, item.end)
        dead = self._dead_reason(video_id)
        if dead is not None:
            raise _fail(f"video {video_id} is recorded as gone in {self.dead_file}: {dead}")
        target = Path(self.cache_dir) / f"{self.cache_name(video_id, section)}.mp4"
        # One process downloads a file; others wanting it wait, then find it cached.
        with _locked(target.with_name(f".{target.name}.lock")):
            if not target.is_file():
                self._download(video_id, target, section)
        return target, 0.0 if section is None else item.start


def read_csv(path: str | Path) -> list[tuple[str, float, float, float, float]]:
    """Rows (youtube_id, start, end, x, y); a malformed row raises naming its line."""
    rows = []
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row:
                continue
            try:
                video_id, start, end, x, y = row[0].strip(), *map(float, row[1:5])
            except (ValueError, IndexError) as error:
                raise ValueError(f"{path}:{number}: expected youtube_id,start,end,x,y; got {row}") from error
            rows.append((video_id, start, end, x, y))
    return rows


def avspeech_items(
    source: str, cache_dir: str | None = None, command: tuple[str, ...] | None = None
) -> Iterator[SourceItem]:
    """Items of an AVSpeech CSV; downloads go to `cache_dir` (default: `<csv dir>/videos`)."""
    rows = read_csv(source)
    fetcher = YtDlpFetcher(
        cache_dir=cache_dir or str(Path(source).parent / "videos"), command=command or YTDLP_COMMAND
    )
    segments_per_video = Counter(row[0] for row in rows)
    for video_id, start, end, x, y in rows:
        yield SourceItem(
            key=sample_key("avspeech", video_id, f"{video_id}_{start:.3f}"), speaker=video_id,
            path=Path(fetcher.cache_dir) / f"{video_id}.mp4", start=start, end=end,
            center_xy=(x, y), fetcher=fetcher,
            meta={"youtube_id": video_id, "whole_video": segments_per_video[video_id] > 1},
        )  # fmt: skip
