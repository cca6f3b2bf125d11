"""AgeGenderNet in PyTorch against face-api's own JavaScript, plus the tfjs weight loader.

The fast tests build tfjs manifests themselves; the slow ones need Node + npm and the files
scripts/fetch-faceapi.sh installs (the fixture runs it when they are missing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from s2f import agegender
from s2f.agegender import AgeGenderLoadError, AgeGenderNet

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "faceapi"
FETCH = ROOT / "scripts" / "fetch-faceapi.sh"
RUNNER = ROOT / "s2f" / "faceapi" / "run_agegender.mjs"
RUNNER_FILES = (  # what run_agegender.mjs loads from the node folder
    "node_modules/@tensorflow/tfjs/dist/tf.node.js",
    "node_modules/@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm",
    "node_modules/@vladmandic/face-api/dist/face-api.node-wasm.js",
    "node_modules/jpeg-js/index.js",
)
GENDER_TOL = 0.01  # probability
AGE_TOL = 0.5  # years
FACES_PER_PHOTO = 3  # largest HOG detections kept per sample photo
CROP_MARGIN = 0.2  # fraction of the box width added on each side
SMALL_CROP = (93, 80)  # (H, W) pixels: below 112, so the resize upsamples
N_TENSORS = 51  # tensors in face-api 1.7.15's age_gender_model manifest
QUANT_LEVELS = 255  # uint8


# ----------------------------------------------------------------------------- helpers


def _tfjs_layout(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Inverse of the loader's mapping: state-dict key/array -> tfjs name/array (test oracle)."""
    prefix, leaf = key.rsplit(".", 1)
    module, _, part = prefix.rpartition(".")
    conv = module.replace(".", "/")
    if part == "depthwise":  # (C, 1, H, W) -> (H, W, C, 1)
        return conv + "/depthwise_filter", value.transpose(2, 3, 0, 1)
    if part == "pointwise" and leaf == "weight":  # (O, I, 1, 1) -> (1, 1, I, O)
        return conv + "/pointwise_filter", value.transpose(2, 3, 1, 0)
    if part == "pointwise":
        return conv + "/bias", value
    name = prefix.replace(".", "/")
    if leaf == "bias":
        return name + "/bias", value
    if value.ndim == 2:  # Linear (O, I) -> (I, O)
        return name + "/weights", value.T
    return name + "/filters", value.transpose(2, 3, 1, 0)  # (O, I, H, W) -> (H, W, I, O)


def _write_manifest(model_dir: Path, tensors: dict[str, np.ndarray], n_shards: int = 2) -> dict:
    """tfjs manifest + shards: rank>1 tensors uint8-quantized, biases float32; returns the
    values tfjs would decode (dequantized in float64, stored as float32)."""
    entries, chunks, decoded = [], [], {}
    for name, value in tensors.items():
        entry = {"name": name, "shape": list(value.shape), "dtype": "float32"}
        if value.ndim > 1:
            lo, hi = float(value.min()), float(value.max())
            scale = (hi - lo) / QUANT_LEVELS
            q = np.round((value - lo) / scale).astype(np.uint8)
            entry["quantization"] = {"dtype": "uint8", "scale": scale, "min": lo}
            chunks.append(q.tobytes())
            decoded[name] = (q.astype(np.float64) * scale + lo).astype(np.float32)
        else:
            chunks.append(value.astype("<f4").tobytes())
            decoded[name] = value.astype(np.float32)
        entries.append(entry)
    blob = b"".join(chunks)
    cut = len(blob) // n_shards
    paths = [f"group1-shard{k + 1}of{n_shards}.bin" for k in range(n_shards)]
    for k, path in enumerate(paths):
        end = len(blob) if k == n_shards - 1 else (k + 1) * cut
        (model_dir / path).write_bytes(blob[k * cut : end])
    manifest = [{"paths": paths, "weights": entries}]
    (model_dir / agegender.MANIFEST_NAME).write_text(json.dumps(manifest))
    return decoded


def _random_tfjs_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    state = AgeGenderNet().state_dict()
    return dict(_tfjs_layout(k, v.numpy()) for k, v in state.items())


# ----------------------------------------------------------------------------- fast tests


def test_loader_maps_every_tensor_and_dequantizes(tmp_path):
    tensors = _random_tfjs_tensors()
    decoded = _write_manifest(tmp_path, tensors)
    assert len(tensors) == N_TENSORS
    weights = agegender.read_tfjs_weights(tmp_path)
    assert weights.keys() == decoded.keys()
    for name, value in decoded.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    model = AgeGenderNet.load(tmp_path)
    loaded = {k: v.numpy() for k, v in model.state_dict().items()}
    assert len(loaded) == N_TENSORS  # one state-dict entry per manifest tensor, none unused
    for key, value in loaded.items():
        name, back = _tfjs_layout(key, value)
        np.testing.assert_array_equal(back, decoded[name], err_msg=key)


def test_loader_rejects_missing_and_unused_tensors(tmp_path):
    tensors = _random_tfjs_tensors()
    missing = dict(tensors)
    del missing["exit_flow/separable_conv/bias"]
    _write_manifest(tmp_path, missing)
    with pytest.raises(AgeGenderLoadError, match=r"missing.*exit_flow\.separable_conv\.pointwise"):
        AgeGenderNet.load(tmp_path)
    _write_manifest(tmp_path, {**tensors, "fc/extra/bias": np.zeros(3, np.float32)})
    with pytest.raises(AgeGenderLoadError, match="unexpected keys.*fc.extra.bias"):
        AgeGenderNet.load(tmp_path)


def test_loader_names_the_fix_when_files_are_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch-faceapi.sh"):
        AgeGenderNet.load(tmp_path)
    _write_manifest(tmp_path, _random_tfjs_tensors())
    (tmp_path / "group1-shard2of2.bin").unlink()
    with pytest.raises(FileNotFoundError, match="group1-shard2of2.bin.*fetch-faceapi.sh"):
        AgeGenderNet.load(tmp_path)


def test_same_padding_puts_the_odd_pixel_after():
    assert agegender._same_pad(112, 3, 2) == (0, 1)  # stride 2: bottom/right only
    assert agegender._same_pad(14, 1, 2) == (0, 0)  # 1x1 stride 2: plain subsampling
    assert agegender._same_pad(56, 3, 1) == (1, 1)
    assert agegender._same_pad(7, 3, 2) == (1, 1)


def test_pad_to_square_centres_with_round_half_up_after():
    image = torch.ones(3, 6, 3)  # (H, W, 3): 3 rows short; JS Math.round(1.5) = 2 rows after
    out = agegender._pad_to_square(image)
    assert out.shape == (6, 6, 3)
    assert out[:, :, 0].sum(1).tolist() == [0, 6, 6, 6, 0, 0]
    tall = agegender._pad_to_square(torch.ones(5, 4, 3))  # 1 column short: it goes after
    assert tall[:, :, 0].sum(0).tolist() == [5, 5, 5, 5, 0]


def test_resize_is_legacy_tf_bilinear():
    # Source position = index * in / out, no half-pixel shift; the high neighbour is clamped.
    row = torch.tensor([0.0, 10.0]).view(1, 2, 1).expand(2, 2, 3)
    up = agegender._resize_bilinear(row.contiguous(), 4)
    assert up[0, :, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    grid = torch.arange(16.0).view(4, 4, 1).expand(4, 4, 3).contiguous()
    down = agegender._resize_bilinear(grid, 2)
    assert down[:, :, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]  # every other pixel, no blur


def test_preprocess_shape_and_normalisation():
    mean = np.array(agegender.RGB_MEAN)
    face = np.full((112, 112, 3), 200, np.uint8)
    x = agegender.preprocess([face, np.zeros((50, 70, 3), np.uint8)])
    assert x.shape == (2, 3, 112, 112) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), (200 - mean) / 255, rtol=1e-6)
    np.testing.assert_allclose(x[1, :, 0, 0].numpy(), -mean / 255, rtol=1e-6)
    with pytest.raises(ValueError, match=r"face_images\[0\].*RGB uint8"):
        agegender.preprocess([np.zeros((8, 8), np.uint8)])


def test_forward_shapes_and_gender_labels():
    torch.manual_seed(0)
    model = AgeGenderNet().eval()
    age, prob_male = model(torch.randn(2, 3, 112, 112))
    assert age.shape == (2,) and prob_male.shape == (2,)
    assert ((prob_male >= 0) & (prob_male <= 1)).all()
    result = model.predict([np.zeros((120, 100, 3), np.uint8)])
    assert result.age.shape == (1,) and result.gender[0] in agegender.GENDERS


# ----------------------------------------------------------------------------- against face-api


@pytest.fixture(scope="module")
def faceapi_cache() -> Path:
    """.cache/faceapi with weights, sample photos and node_modules; fetched when missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: face-api's JavaScript reference cannot run")
    needed = [CACHE / "model" / agegender.MANIFEST_NAME, *(CACHE / "node" / f for f in RUNNER_FILES)]
    if not all(path.is_file() for path in needed):
        subprocess.run(["bash", str(FETCH)], check=True, cwd=ROOT)
    missing = [str(path) for path in needed if not path.is_file()]
    assert not missing, f"scripts/fetch-faceapi.sh left files missing: {missing}"
    return CACHE


def _crops(photo: np.ndarray) -> list[np.ndarray]:
    """Face crops with odd padding both ways (tall and wide), plus one small upsampled crop."""
    from PIL import Image

    from s2f.faces import detect_faces

    boxes = sorted(detect_faces(photo, "hog", upsample=0), key=lambda b: -b.area)
    assert boxes, "no face found in a face-api sample photo"
    h, w = photo.shape[:2]
    crops = []
    for box in boxes[:FACES_PER_PHOTO]:
        m = CROP_MARGIN * box.width
        top, left = int(max(box.top - m, 0)), int(max(box.left - m, 0))
        bottom, right = int(min(box.bottom + m, h - 8)), int(min(box.right + m, w - 8))
        crops.append(photo[top : bottom + 7, left:right])  # taller than wide by ~7
        crops.append(photo[top:bottom, left : right + 5])  # wider than tall by ~5
    small = Image.fromarray(crops[0]).resize(SMALL_CROP[::-1], Image.BILINEAR)
    return crops + [np.asarray(small)]


def _run_faceapi(paths: list[Path], cache: Path) -> list[dict]:
    cmd = ["node", str(RUNNER), "--node-dir", str(cache / "node"),
           "--model-dir", str(cache / "model"), *map(str, paths)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"run_agegender.mjs failed:\n{proc.stderr}"
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.slow
def test_real_manifest_maps_every_tensor(faceapi_cache):
    weights = agegender.read_tfjs_weights(faceapi_cache / "model")
    assert len(weights) == N_TENSORS
    state = agegender.tfjs_to_state_dict(weights)
    expected = AgeGenderNet().state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].shape == expected[k].shape for k in expected)


@pytest.mark.slow
def test_matches_faceapi_javascript(faceapi_cache, tmp_path):
    from PIL import Image

    photos = sorted((faceapi_cache / "samples").glob("sample*.jpg"))
    assert photos, f"{faceapi_cache}/samples has no sample photos; run scripts/fetch-faceapi.sh"
    crops = []
    for photo in photos:
        crops += _crops(np.asarray(Image.open(photo).convert("RGB")))
    # Same decoded pixels on both sides: the runner reads these .npy files, not the JPEGs.
    paths = [tmp_path / f"face{i:02d}.npy" for i in range(len(crops))]
    for path, crop in zip(paths, crops):
        np.save(path, np.ascontiguousarray(crop))
    ref = _run_faceapi(paths, faceapi_cache)
    ours = AgeGenderNet.load(faceapi_cache / "model").predict(crops)
    assert {r["backend"] for r in ref} == {"wasm"}
    ref_age = np.array([r["age"] for r in ref])
    ref_male = np.array([r["probMale"] for r in ref])
    assert np.abs(ours.age - ref_age).max() < AGE_TOL, (ours.age, ref_age)
    assert np.abs(ours.prob_male - ref_male).max() < GENDER_TOL, (ours.prob_male, ref_male)
    assert list(ours.gender) == [r["gender"] for r in ref]
