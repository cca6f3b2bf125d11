import math

import numpy as np
import pytest
import soundfile
import torch

from s2f.audio import (
    AudioLoadError,
    fit_duration,
    load_audio,
    num_frames,
    spectrogram,
)


def numpy_reference_spectrogram(wave: np.ndarray) -> np.ndarray:
    """tf.signal.stft(frame_length=400, frame_step=160, fft_length=512), periodic Hann, then
    sgn(x)|x|^0.3 on real and imaginary parts: written independently with explicit loops."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic Hann
    frames = []
    start = 0
    while start + 400 <= len(wave):
        frame = np.zeros(512)
        frame[:400] = wave[start : start + 400] * window  # zero-padded at its end
        frames.append(np.fft.rfft(frame))
        start += 160
    spec = np.array(frames)  # (T, 257)
    parts = np.stack([spec.real, spec.imag])  # (2, T, 257)
    return np.sign(parts) * np.abs(parts) ** 0.3


def uncompressed(parts: np.ndarray) -> np.ndarray:
    """Inverse of sgn(x)|x|^0.3."""
    return np.sign(parts) * np.abs(parts) ** (1 / 0.3)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding F0 under a syllable-rate envelope, plus breath noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.2 * envelope * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "speech"])
def test_spectrogram_matches_numpy_reference(kind):
    wave = (
        np.random.default_rng(1).standard_normal(96_000).astype(np.float32)
        if kind == "random"
        else speech_like(6.0)
    )
    ours = spectrogram(torch.from_numpy(wave)).double().numpy()
    reference = numpy_reference_spectrogram(wave.astype(np.float64))
    assert ours.shape == reference.shape == (2, 598, 257)
    # float32 FFT rounding (~2e-7 before compression) grows in quiet bins under |x|^0.3: 4e-6
    # to 1.1e-5 by CPU; a wrong window, hop or padding errs by more than 1e-2.
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 3e-5
    # Pointwise, undo the compression: |x|^0.3 is steep near zero, where float32 rounding of the
    # spectrum (~3e-7 of its peak) becomes up to ~1.5e-3 of the compressed peak.
    error = np.abs(uncompressed(ours) - uncompressed(reference)).max()
    assert error / np.abs(uncompressed(reference)).max() < 2e-6


def test_spectrogram_is_batched_and_float32():
    waves = torch.randn(3, 4, 16_000)
    spec = spectrogram(waves)
    assert spec.shape == (3, 4, 2, num_frames(16_000), 257) and spec.dtype == torch.float32
    torch.testing.assert_close(spec[2, 1], spectrogram(waves[2, 1]))


def test_torch_stft_centred_framing_is_not_ours():
    # The paper's framing gives 598 frames; torch.stft(center=False, n_fft=512) gives 597.
    wave = torch.randn(96_000)
    ours = spectrogram(wave)
    theirs = torch.stft(wave, 512, 160, 400, torch.hann_window(400), center=False, return_complex=True)
    assert ours.shape[-2] == 598 and theirs.shape[-1] == 597


def test_tone_peaks_in_bin_32():
    t = torch.arange(96_000) / 16_000
    spec = spectrogram(torch.sin(2 * math.pi * 1000 * t))  # 1000 Hz / (16000 / 512) = bin 32
    power = spec.abs().pow(2 / 0.3).sum(dim=0).mean(dim=0)  # undo the compression: (257,)
    assert int(power.argmax()) == 32


def test_fit_duration_loops_then_cuts():
    clip = torch.randn(40_000)  # 2.5 s
    fitted = fit_duration(clip)
    assert fitted.shape == (96_000,)
    torch.testing.assert_close(fitted[:40_000], clip)
    torch.testing.assert_close(fitted[40_000:80_000], clip)
    torch.testing.assert_close(fitted[80_000:], clip[:16_000])
    long = torch.randn(2, 200_000)
    torch.testing.assert_close(fit_duration(long), long[:, :96_000])
    with pytest.raises(ValueError, match="empty"):
        fit_duration(torch.zeros(0))


@pytest.mark.parametrize("rate", [8_000, 44_100, 48_000])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_load_audio_resamples_and_mixes_down(tmp_path, rate, channels, fmt):
    seconds, freq = 1.0, 440.0
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * freq * t)
    # Stereo: the tone in the left channel only, its mix-down is half the tone.
    data = tone if channels == 1 else np.stack([tone, np.zeros_like(tone)], axis=1)
    path = tmp_path / f"tone.{fmt.lower()}"
    soundfile.write(path, data, rate, format=fmt)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(wave.shape[0] - 16_000 * seconds) <= 1
    expected = (0.5 if channels == 1 else 0.25) * np.sin(2 * np.pi * freq * np.arange(16_000) / 16_000)
    interior = slice(800, 15_200)  # away from the resampler's edge effects
    correlation = np.corrcoef(wave.numpy()[interior], expected[interior])[0, 1]
    assert correlation > 0.99
    assert np.abs(wave.numpy()[interior]).max() == pytest.approx(np.abs(expected).max(), rel=0.05)


def test_load_audio_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    with pytest.raises(AudioLoadError, match="corrupt.wav"):
        load_audio(corrupt)
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    with pytest.raises(AudioLoadError, match="empty.flac"):
        load_audio(empty)
    silent = tmp_path / "zero_frames.wav"
    soundfile.write(silent, np.zeros(0), 16_000)
    with pytest.raises(AudioLoadError, match="zero_frames.wav"):
        load_audio(silent)
    with pytest.raises(AudioLoadError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
