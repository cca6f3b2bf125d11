"""`s2f predict AUDIO --ckpt CKPT [--decoder DEC] --out DIR`: speech -> face feature (-> face).

Any audio file `s2f.audio.load_audio` reads (WAV, FLAC, OGG, MP3 through libsndfile; m4a, mp4
and the rest through PyAV), at any rate and length, becomes 16 kHz mono, then:

- up to 6 s: looped to exactly 6 s (`fit_duration`), as in training (SPEC section 1): one
  window;
- longer: cut into 6-s windows starting every 6 s; the last window is the clip's final 6 s
  (it overlaps the one before instead of being looped), so every window is real speech of
  exactly the training length. v_s is the mean of the windows' v_s. The encoder was trained
  on 6-s inputs; feeding it one long spectrogram would also run (it pools over time), but
  its batch-norm statistics and pooled features were fitted at 6 s, so the windows keep each
  input in the training regime and the mean pools the whole clip.

Writes `feature.npy` (D,) float32 and, with a decoder checkpoint, `face.png` (the decoder's
S x S canonical face of v_s). Returns a dict of what it did.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from s2f.audio import SAMPLE_RATE, SECONDS, fit_duration, load_audio, spectrogram
from s2f.decoder import FaceDecoder

WINDOW = round(SECONDS * SAMPLE_RATE)  # 96,000 samples
FEATURE_FILE, FACE_FILE = "feature.npy", "face.png"


def windows(wave: torch.Tensor) -> torch.Tensor:
    """(N,) samples -> (W, 96000) 6-s windows (module docstring: loop, or cover and average)."""
    if wave.shape[-1] <= WINDOW:
        return fit_duration(wave)[None]  # (1, 96000)
    count = math.ceil(wave.shape[-1] / WINDOW)
    starts = [min(i * WINDOW, wave.shape[-1] - WINDOW) for i in range(count)]
    return torch.stack([wave[s : s + WINDOW] for s in starts])  # (W, 96000)


def load_voice_model(ckpt: str | Path):
    """The Speech2Face model of a training checkpoint, in eval mode on the CPU."""
    from s2f.module import Speech2Face

    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint; give a Speech2Face .ckpt from `s2f fit`")
    return Speech2Face.load_from_checkpoint(ckpt, map_location="cpu").eval()


@torch.no_grad()
def voice_feature(model: torch.nn.Module, wave: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(N,) 16 kHz samples -> (v_s (D,) averaged over windows, number of windows)."""
    clips = windows(wave)  # (W, 96000)
    v_s = model(spectrogram(clips))  # (W, D)
    return v_s.mean(dim=0), len(clips)


@torch.no_grad()
def save_face(decoder: FaceDecoder, feature: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    if feature.shape[-1] != decoder.config.in_dim:
        raise ValueError(f"the voice model predicts D={feature.shape[-1]} features, but the decoder "
                         f"takes D={decoder.config.in_dim}; use a decoder trained on the same teacher")
    image = decoder(feature[None])["image"][0]  # (3, S, S)
    pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def predict(
    audio_path: str | Path,
    ckpt: str | Path,
    out_dir: str | Path,
    decoder: str | Path | FaceDecoder | None = None,
) -> dict:
    """Write feature.npy (and face.png with a decoder) for one audio file into `out_dir`."""
    from s2f.decoder_training import load_decoder

    wave = load_audio(audio_path)  # (N,) 16 kHz mono
    v_s, count = voice_feature(load_voice_model(ckpt), wave)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / FEATURE_FILE, v_s.numpy().astype(np.float32))
    result = {"audio": str(audio_path), "seconds": wave.shape[-1] / SAMPLE_RATE,
              "windows": count, "feature": str(out / FEATURE_FILE), "face": None}  # fmt: skip
    if decoder is not None:
        model = decoder if isinstance(decoder, FaceDecoder) else load_decoder(decoder)
        result["face"] = str(save_face(model, v_s, out / FACE_FILE))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="s2f predict", description="speech -> face feature v_s (and a face image)"
    )
    parser.add_argument("audio", help="audio file of any common format and length")
    parser.add_argument("--ckpt", required=True, help="Speech2Face checkpoint (s2f fit)")
    parser.add_argument("--decoder", help="face decoder checkpoint (configs/decoder-*.yaml)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    print(json.dumps(predict(args.audio, args.ckpt, args.out, args.decoder), indent=2))
    return 0
