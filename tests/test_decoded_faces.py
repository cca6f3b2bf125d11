"""Decoded-face stage of `s2f evaluate --decoder`: ranks with missed faces, reading real faces."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from datamodules.bench import write_split
from datamodules.faces import shrink_face
from s2f import craniofacial as cf
from s2f import decoded_faces as dfc
from s2f.decoder import FaceDecoder
from s2f.demo.render import FaceAppearance, render_canonical, widths_in_iod
from s2f.evaluate import SplitFeatures
from s2f.faces import extract_face
from s2f.teacher import DlibTeacher
from shards import schema

DECODED_SIZE = 64  # the demo decoder's output side
# Six demo-world faces, each field spread over its range so that no two faces look alike.
APPEARANCES = [
    FaceAppearance(nose_width=nose, nose_height=1 - nose, mouth_width=mouth, face_width=width,
                   jaw_width=width, skin_tone=skin, hair_style=hair)
    for nose, mouth, width, skin, hair in [(0.0, 0.3, 0.2, 0.2, 0), (0.3, 0.9, 0.8, 0.7, 1), (0.6, 0.1, 0.4, 0.4, 2),
                                          (1.0, 0.6, 0.6, 0.9, 3), (0.8, 0.4, 0.1, 0.1, 4), (0.1, 0.7, 0.9, 0.5, 1)]
]  # fmt: skip


def test_decoded_ranks_of_a_hand_made_gallery():
    # Gallery rows e0..e3 of speakers a, a, b, c. Query 0 is its own face; query 1 is speaker a's
    # other face (identity hit, item rank last: it ties with the other zeros); query 2 was not
    # found by dlib; query 3 leans to its own face.
    true = torch.eye(4)
    speakers = np.array(["a", "a", "b", "c"])
    descriptors = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [np.nan] * 4, [0, 0, 1, 2]], dtype=np.float32)
    for metric in ("cosine", "l2"):
        items, identity = dfc.decoded_ranks(descriptors, true, speakers, metric)
        assert items.tolist() == [1, 4, 4, 1], metric
        assert identity.tolist() == [1, 1, 4, 1], metric  # the missed query: 1 + 3 other speakers' clips


def test_detection_counts_and_interval():
    result = dfc.detection(np.array([True, True, False, True]))
    assert (result["detected"], result["n"], result["rate"]) == (3, 4, 0.75)
    assert 0 <= result["ci"][0] < 0.75 < result["ci"][1] <= 1


def test_true_geometry_adds_widths_in_iod_where_eye_spacing_is_known():
    demo = [{"face_width": w, "eye_spacing": e, "origin": "x"} for w, e in ((0.2, 0.5), (0.8, 0.1))]
    columns = dfc.true_geometry(demo)
    assert set(columns) == {"face_width", "eye_spacing", "face_width/IOD"}
    assert columns["face_width/IOD"] == pytest.approx([widths_in_iod(a)["face_width/IOD"] for a in demo])
    # one item without eye spacing: no IOD column (it must be known for every item)
    assert set(dfc.true_geometry(demo + [{"face_width": 0.5}])) == {"face_width"}


def test_untrained_decoder_faces_are_counted_as_missed():
    decoder = FaceDecoder.from_preset("tiny").eval()  # untrained: dlib finds no face
    features = torch.randn(3, 128)
    images, drawn = cf.decode_faces(decoder, features, batch_size=2)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    with torch.no_grad():
        np.testing.assert_allclose(drawn, decoder(features)["landmarks"].numpy(), atol=1e-6)  # batches in order
    reading = dfc.read_decoded_faces(images, drawn, teacher=None)
    assert reading.landmarks.shape == (3, 68, 2) and reading.descriptors is None
    assert not reading.detected.any() and np.isnan(reading.landmarks).all()
    assert cf.upsample_for_dlib(images[0]).shape == (160, 160, 3)


class LookupDecoder(nn.Module):
    """Stands in for a trained decoder: the face stored for the nearest stored feature."""

    def __init__(self, features: torch.Tensor, images: np.ndarray, landmarks: np.ndarray):
        super().__init__()
        self.features = nn.Parameter(features, requires_grad=False)  # (N, D)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (N, 3, S, S)
        self.images = nn.Parameter(pixels, requires_grad=False)
        self.landmarks = nn.Parameter(torch.from_numpy(landmarks), requires_grad=False)  # (N, 68, 2)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        nearest = torch.cdist(features, self.features).argmin(dim=1)  # (B,)
        return {"image": self.images[nearest], "landmarks": self.landmarks[nearest]}


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_faces(folder: Path, keys: list[str], faces: dict[str, dict[str, bytes]]) -> Path:
    """A test split whose sample `key` holds the members faces[key] (face.jpg / portrait.jpg)."""
    samples = [
        {"key": key, "fc7": np.zeros(4, np.float32), "meta": {}, "spec": np.zeros((2, 4, 3)),
         "face_jpg": faces.get(key, {}).get(schema.FACE),
         "portrait_jpg": faces.get(key, {}).get(schema.PORTRAIT)}
        for key in keys
    ]  # fmt: skip
    write_split(folder, "test", samples, "spectrogram", 4, samples_per_shard=2)
    return folder


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Six faces aligned as the shard builder aligns them, their dlib descriptors, the same
    crops shrunk to the decoder's output size, and a split holding them as face.jpg."""
    crops = np.stack([extract_face(render_canonical(a)).crop for a in APPEARANCES])  # (6, 224, 224, 3)
    teacher = DlibTeacher.load()
    small = np.stack([np.asarray(Image.fromarray(c).resize((DECODED_SIZE,) * 2, Image.BILINEAR)) for c in crops])
    keys = [f"demo/s{i}/c0" for i in range(len(crops))]
    shards = write_faces(tmp_path_factory.mktemp("faces"), keys,
                         {key: {schema.FACE: jpeg(crop)} for key, crop in zip(keys, crops)})  # fmt: skip
    return {"teacher": teacher, "v_f": torch.from_numpy(teacher.features(crops)), "small": small,
            "keys": keys, "shards": shards}  # fmt: skip


def test_reference_faces_are_the_portraits_else_the_faces_shrunk_as_for_training(tmp_path):
    red, blue = np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)
    red[:20, :, 0], blue[:, :20, 2] = 250, 250  # top half red; left half blue
    faces = {"a": {schema.FACE: jpeg(red), schema.PORTRAIT: jpeg(blue)}, "c": {schema.FACE: jpeg(red)}}
    shards = write_faces(tmp_path / "test", ["a", "b", "c"], faces)
    images, present = dfc.reference_faces(shards, ["c", "b", "a"], 8)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert present.tolist() == [True, False, True]
    assert not images[1].any()  # no face: black, and left out
    decoded = {name: np.array(Image.open(io.BytesIO(data))) for name, data in faces["a"].items()}
    for row, face in ((0, decoded[schema.FACE]), (2, decoded[schema.PORTRAIT])):  # the portrait wins
        expected = cf.to_uint8(shrink_face(face, 8))[0]
        np.testing.assert_array_equal(images[row], expected)
    assert images[0, 1, 4, 0] > 200 and images[0, 6, 4, 0] < 50  # red on top
    assert images[2, 4, 1, 2] > 200 and images[2, 4, 6, 2] < 50  # blue on the left


def test_shrunk_faces_are_found_and_read_as_their_own(rendered):
    drawn = np.zeros((len(rendered["small"]), 68, 2), np.float32)
    reading = dfc.read_decoded_faces(rendered["small"], drawn, rendered["teacher"])
    assert reading.detected.all()
    assert np.abs(reading.landmarks).max() < 1  # normalised coordinates, inside the image
    distance = np.linalg.norm(reading.descriptors[:, None] - rendered["v_f"].numpy()[None], axis=2)  # (6, 6)
    assert (distance.argmin(axis=1) == np.arange(6)).all()
    assert distance.diagonal().max() < 0.6  # dlib's same-person threshold


def test_face_stage_on_faces_decoded_by_lookup(rendered):
    # F2F decodes every clip to its own face; S2F decodes clip i to the next clip's face.
    v_f = rendered["v_f"]
    n = len(v_f)
    split = SplitFeatures(
        keys=rendered["keys"], speakers=np.array([f"s{i}" for i in range(n)]),
        v_f=v_f, v_s={"6s": v_f.roll(-1, dims=0)},
        attributes=[{"nose_width": a.nose_width, "face_width": a.face_width, "age": 30} for a in APPEARANCES],
        skipped=[],
    )  # fmt: skip
    # the lookup decoder "draws" each face with dlib's own reading of it, shifted: drawn vs read
    # must then pair each face's rows exactly (r = 1 for every measurement)
    read = dfc.read_decoded_faces(rendered["small"], np.zeros((n, 68, 2), np.float32)).landmarks
    lookup = LookupDecoder(v_f, rendered["small"], read + np.float32(0.01))
    stage = dfc.FaceStage(Path("lookup"), lookup, rendered["teacher"], "dlib", "dlib", rendered["shards"])
    section, readings = stage.evaluate(split, np.arange(n), seed=0)
    assert set(readings) == {"f2f", "6s"}
    f2f, s2f = section["f2f"], section["s2f"]["6s"]
    assert f2f["detection"]["rate"] == s2f["detection"]["rate"] == 1.0
    for table in (f2f["retrieval"], f2f["identity_retrieval"], s2f["retrieval"]):
        assert table["gallery_size"] == n and table["chance"]["recall@1"] == pytest.approx(1 / n)
    for metric in ("cosine", "l2"):
        assert f2f["retrieval"][metric]["recall@1"]["value"] == 1.0
        assert f2f["retrieval"]["chance_ratio"][metric]["recall@1"] == pytest.approx(n)
        assert s2f["retrieval"][metric]["recall@1"]["value"] == 0.0  # the next face is not one's own
    for face_set in (f2f, s2f):
        assert list(face_set["drawn_vs_read"]) == list(cf.MEASUREMENTS)
        for name, row in face_set["drawn_vs_read"].items():
            assert row["n"] == n and row["r"] == pytest.approx(1.0, abs=0.02), name
    assert list(s2f["craniofacial"]) == list(cf.MEASUREMENTS)
    assert all(row["n"] == n for row in s2f["craniofacial"].values())
    assert set(f2f["true_geometry"]) == {"nose_width ~ nose_width", "face_width ~ face_width"}
    assert f2f["true_geometry"]["nose_width ~ nose_width"]["r"] > 0.5
    for table in (f2f["true_geometry"], f2f["drawn_vs_read"], s2f["craniofacial"]):  # six speakers
        for name, row in table.items():
            assert -1 <= row["ci"][0] <= row["ci"][1] <= 1, name
    assert all(row["ci"][0] > 0.9 for row in f2f["drawn_vs_read"].values())  # r ~ 1 on every resample
    for pair, row in f2f["true_geometry_drawn"].items():  # drawn = read, shifted: same lengths
        assert row["r"] == pytest.approx(f2f["true_geometry"][pair]["r"], abs=1e-5), pair
    assert section["teacher"] == "dlib" and section["image_size"] == DECODED_SIZE
    # the reference: the true face.jpg crops shrunk to 64 px, read as decoded faces are; the
    # lookup decoder drew those same crops (resized by PIL), so F2F follows them closely
    reference = section["reference"]
    assert (reference["image_size"], reference["items"]) == (DECODED_SIZE, n)
    assert reference["detection"]["rate"] == 1.0
    assert list(reference["f2f_vs_reference"]) == list(cf.MEASUREMENTS)
    for name in ("nose_width", "mouth_width", "face_width"):
        assert reference["f2f_vs_reference"][name]["r"] > 0.9, name
    assert reference["true_geometry"]["nose_width ~ nose_width"]["r"] > 0.5
