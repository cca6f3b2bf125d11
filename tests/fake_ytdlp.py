"""A stand-in for yt-dlp in tests: serves videos from a local folder.

argv: --src DIR --id ID --out OUT --start S --end E (S, E empty: the whole video). Each call is
appended to DIR/calls.log. DIR/ID.dead makes it fail like a removed video; a missing
DIR/ID.mp4 fails like a transient HTTP error.
"""

import argparse
import shutil
import sys
from pathlib import Path

from s2f.video import read_segment, write_mp4

parser = argparse.ArgumentParser()
for name in ("--src", "--id", "--out", "--start", "--end"):
    parser.add_argument(name, default="")
args = parser.parse_args()
src = Path(args.src)
with open(src / "calls.log", "a") as log:
    log.write(f"{args.id} {args.start} {args.end}\n")
if (src / f"{args.id}.dead").exists():
    sys.exit(print(f"ERROR: [youtube] {args.id}: Video unavailable. This video has been removed", file=sys.stderr) or 1)
video = src / f"{args.id}.mp4"
if not video.exists():
    sys.exit(print("ERROR: unable to download video data: HTTP Error 503", file=sys.stderr) or 1)
if not args.start:
    shutil.copy(video, args.out)
else:
    start, end = float(args.start), float(args.end)
    segment = read_segment(video, start, end, frame_times=[i / 5 for i in range(int((end - start) * 5))])
    write_mp4(args.out, segment.frames, 5, segment.audio, segment.sample_rate)
