"""`s2f predict`: any audio -> feature.npy (+ face.png) with tiny checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import soundfile
import torch
from PIL import Image

from s2f import predict as predict_module
from s2f.decoder_training import FaceDecoderModule, load_decoder
from s2f.module import Speech2Face

RATE = 22_050  # not 16 kHz: load_audio resamples


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _checkpoint(module: pl.LightningModule, path):
    """What Lightning writes that loading needs: weights, hyper-parameters, version."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    voice = Speech2Face(encoder="tiny", feature_dim=128, num_classes=4)
    decoder = FaceDecoderModule(preset="tiny", in_dim=128)
    return _checkpoint(voice, folder / "voice.ckpt"), _checkpoint(decoder, folder / "decoder.ckpt")


def test_windows_loop_short_and_cover_long_audio():
    short = torch.arange(32_000.0)  # 2 s
    assert predict_module.windows(short).shape == (1, 96_000)
    long = torch.arange(160_000.0)  # 10 s: [0, 6) and the final 6 s [4, 10)
    cut = predict_module.windows(long)
    assert cut.shape == (2, 96_000)
    assert cut[0, 0] == 0 and cut[1, -1] == 159_999 and cut[1, 0] == 64_000


def test_predict_short_wav_and_long_flac(ckpts, tmp_path):
    voice, decoder = ckpts
    wav, flac = tmp_path / "short.wav", tmp_path / "long.flac"
    soundfile.write(wav, _tone(2.0), RATE)
    soundfile.write(flac, _tone(10.0), RATE)

    short = predict_module.predict(wav, voice, tmp_path / "short", decoder=decoder)
    assert short["windows"] == 1 and abs(short["seconds"] - 2.0) < 1e-3
    assert np.load(short["feature"]).shape == (128,)
    assert np.asarray(Image.open(short["face"])).shape == (32, 32, 3)

    assert predict_module.main([str(flac), "--ckpt", str(voice), "--out", str(tmp_path / "long")]) == 0
    feature = np.load(tmp_path / "long" / predict_module.FEATURE_FILE)
    assert not (tmp_path / "long" / predict_module.FACE_FILE).exists()
    model = predict_module.load_voice_model(voice)
    wave = predict_module.load_audio(flac)
    with torch.no_grad():
        per_window = model(predict_module.spectrogram(predict_module.windows(wave)))  # (2, D)
    np.testing.assert_allclose(feature, per_window.mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_decoder_of_another_feature_dim_is_refused(ckpts, tmp_path):
    voice, _ = ckpts
    wav = tmp_path / "a.wav"
    soundfile.write(wav, _tone(1.0), RATE)
    other = load_decoder(_checkpoint(FaceDecoderModule(preset="tiny", in_dim=64), tmp_path / "d.ckpt"))
    with pytest.raises(ValueError, match="D=128"):
        predict_module.predict(wav, voice, tmp_path / "out", decoder=other)
