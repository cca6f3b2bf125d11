"""Audio stage: load any audio file, fit it to the model's duration, make the spectrogram.

The spectrogram is the paper's input (SPEC section 1): 25 ms periodic Hann frames every 10 ms,
each zero-padded at its end to 512 samples (TensorFlow's `tf.signal.stft` framing, no centre
padding), one-sided FFT (257 bins), then power-law compression sgn(x)|x|^0.3 applied to the
real and imaginary parts separately. 6 s at 16 kHz gives 598 frames.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16_000  # Hz
SECONDS = 6.0  # s of audio per training sample
WIN_LENGTH = 400  # samples = 25 ms
HOP_LENGTH = 160  # samples = 10 ms
N_FFT = 512  # samples, each frame zero-padded at its end to this
N_BINS = N_FFT // 2 + 1  # 257 one-sided frequency bins
COMPRESSION = 0.3  # power-law exponent on real and imaginary parts
RESAMPLE_ZERO_CROSSINGS = 6  # sinc lobes each side of the resampling kernel
RESAMPLE_ROLLOFF = 0.99  # low-pass cut-off as a fraction of the lower Nyquist rate


class AudioLoadError(ValueError):
    """An audio file could not be read; the message names the file and the fix."""


def num_frames(num_samples: int) -> int:
    """Frames of the paper's framing for `num_samples` samples (96,000 -> 598)."""
    if num_samples < WIN_LENGTH:
        return 0
    return (num_samples - WIN_LENGTH) // HOP_LENGTH + 1


def _read_with_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    return data.T, rate  # (C, N)


def _read_with_av(path: Path) -> tuple[np.ndarray, int]:
    try:
        from s2f.video import decode_audio
    except ImportError as error:  # pragma: no cover - depends on the install
        raise AudioLoadError(
            f"{path}: soundfile cannot read this format and PyAV is missing; "
            "install the video extra: pip install 's2f[video]'"
        ) from error
    return decode_audio(path)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read an audio file of any common format and rate as mono float32 at `sample_rate`.

    WAV, FLAC, OGG and MP3 go through libsndfile; anything else (m4a, mp4, ...) through PyAV.
    Returns a tensor of shape (N,). Raises `AudioLoadError` naming the file when it is
    missing, unreadable or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioLoadError(f"{path}: no such audio file; check the path")
    try:
        channels, rate = _read_with_soundfile(path)  # (C, N)
    except Exception as sf_error:  # libsndfile raises its own error types
        try:
            channels, rate = _read_with_av(path)
        except AudioLoadError:
            raise
        except Exception as av_error:
            raise AudioLoadError(
                f"{path}: not a readable audio file (soundfile: {sf_error}; PyAV: {av_error}); "
                "re-encode it as WAV or FLAC"
            ) from av_error
    if channels.size == 0:
        raise AudioLoadError(f"{path}: contains no audio samples; remove it or re-export it")
    mono = torch.from_numpy(np.ascontiguousarray(channels.mean(axis=0), dtype=np.float32))  # (N,)
    return resample(mono, rate, sample_rate)


def _sinc_kernels(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Hann-windowed sinc kernels for rational resampling orig -> new (both reduced).

    Returns kernels (new, 2 * width + orig) and the padding width.
    """
    cutoff = min(orig, new) * RESAMPLE_ROLLOFF
    width = math.ceil(RESAMPLE_ZERO_CROSSINGS * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, :] / orig  # (1, L)
    phases = -torch.arange(new, dtype=torch.float64)[:, None] / new  # (new, 1)
    t = ((phases + taps) * cutoff).clamp(-RESAMPLE_ZERO_CROSSINGS, RESAMPLE_ZERO_CROSSINGS)
    window = torch.cos(t * math.pi / RESAMPLE_ZERO_CROSSINGS / 2) ** 2
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(math.pi * t) / (math.pi * t))
    return (sinc * window * cutoff / orig).float(), width


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling of (..., N) from `orig_rate` to `new_rate` (windowed sinc)."""
    if orig_rate == new_rate:
        return wave
    divisor = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // divisor, new_rate // divisor
    kernels, width = _sinc_kernels(orig, new)  # (new, L)
    leading, length = wave.shape[:-1], wave.shape[-1]
    flat = wave.reshape(-1, 1, length)  # (B, 1, N)
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded, kernels[:, None, :].to(wave), stride=orig)  # (B, new, F)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)  # (B, new * F)
    target = math.ceil(new * length / orig)
    return out[:, :target].reshape(*leading, target)


def fit_duration(
    wave: torch.Tensor, seconds: float = SECONDS, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """Loop a short clip (..., N) until it is long enough, then cut it to exactly `seconds`."""
    target = round(seconds * sample_rate)
    length = wave.shape[-1]
    if length == 0:
        raise ValueError("fit_duration: the waveform is empty; nothing to loop")
    repeats = math.ceil(target / length)
    if repeats > 1:
        wave = wave.repeat(*([1] * (wave.dim() - 1)), repeats)
    return wave[..., :target]


def spectrogram(wave: torch.Tensor) -> torch.Tensor:
    """Compressed complex spectrogram: (..., N) samples -> (..., 2, T, 257) float32.

    T = (N - 400) // 160 + 1. Channel 0 is the real part, channel 1 the imaginary part, each
    compressed as sgn(x) * |x|^0.3. Runs on the waveform's device, in float32: the result
    matches a float64 reference to 4e-6 - 1.1e-5 in relative (Frobenius) norm, by the CPU's
    FFT kernels. Before compression every value is within ~3e-7 of the peak; |x|^0.3 magnifies
    that near zero, to up to ~1.5e-3 of the compressed peak.
    On the CPU a batch is done one clip at a time: a clip's 1.2 MB of intermediates stays in
    cache, which makes a batch of 32 about 2.5x faster than transforming it whole.
    """
    if wave.shape[-1] < WIN_LENGTH:
        raise ValueError(
            f"spectrogram: need at least {WIN_LENGTH} samples, got {wave.shape[-1]}; "
            "fit the clip to a longer duration first"
        )
    wave = wave.float()
    if wave.device.type != "cpu" or wave.dim() == 1:
        return _compressed_spectrum(wave).contiguous()
    clips = wave.reshape(-1, wave.shape[-1])  # (M, N)
    out = torch.empty(clips.shape[0], 2, num_frames(wave.shape[-1]), N_BINS)  # (M, 2, T, Q)
    for clip, target in zip(clips, out):
        target.copy_(_compressed_spectrum(clip))
    return out.reshape(*wave.shape[:-1], *out.shape[1:])


def _compressed_spectrum(wave: torch.Tensor) -> torch.Tensor:
    """(..., N) float32 -> (..., 2, T, 257) as a strided view (see `spectrogram`)."""
    frames = wave.unfold(-1, WIN_LENGTH, HOP_LENGTH)  # (..., T, 400)
    window = torch.hann_window(WIN_LENGTH, periodic=True, device=wave.device)
    parts = torch.view_as_real(torch.fft.rfft(frames * window, n=N_FFT))  # (..., T, 257, 2)
    compressed = parts.abs().pow_(COMPRESSION)
    torch.copysign(compressed, parts, out=compressed)  # sgn(x) |x|^0.3, in place
    return compressed.movedim(-1, -3)  # (..., 2, T, 257)
