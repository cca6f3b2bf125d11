"""`s2f evaluate`, its report and the validation retrieval callback, on tiny shards and a tiny model.

Tests that run the model over the shards are marked slow (about 20 s for the module's fixtures).
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import WandbLogger
from torch.utils.data import DataLoader

from callbacks.retrieval import RetrievalMetrics
from datamodules.bench import speechlike_wave, write_split
from s2f import evaluate as ev
from s2f import metrics as m
from s2f.module import Speech2Face
from s2f.report import SECTIONS, render_report
from s2f.teacher import TeacherHead
from shards import schema
from tests.test_agegender import faceapi_cache  # noqa: F401 - the fixture, fetched when missing

DIM, CLASSES, BINS = 16, 8, 16  # tiny model: 16-D features, 16 frequency bins
CLIPS = 4  # clips per speaker
SPLIT_SPEAKERS = {"train": 8, "test": 6}
ORIGINS = ("north", "south", "east")
LANGUAGES = ("en", "es", "cmn")  # spoken, one per origin
GALLERY = 16  # of the 24 test clips: the gallery is a sample
DURATIONS = (3.0, 6.0)
TUPLES = 200


# ----------------------------------------------------------------------------- fixtures


def _face_jpeg(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _truth(rng: np.random.Generator, speaker: int) -> dict:
    """Demo-world-like ground truth: flat traits, face geometry under "appearance"."""
    return {
        "gender": ("female", "male")[speaker % 2], "age": int(rng.integers(18, 75)),
        "origin": ORIGINS[speaker % len(ORIGINS)], "language": LANGUAGES[speaker % len(ORIGINS)],
        "vocal_tract_length": float(rng.uniform(13.0, 18.0)), "f0_hz": float(rng.uniform(90.0, 250.0)),
        "appearance": {"face_width": float(rng.uniform(0.3, 0.7)), "jaw_width": float(rng.uniform(0.3, 0.7))},
    }


def make_split(folder, split: str, speakers: int, seed: int) -> None:
    """Audio-payload shards with face.jpg and attributes; fc7 shifted by gender so probes learn."""
    rng = np.random.default_rng(seed)
    samples = []
    for s in range(speakers):
        speaker, truth = f"{split}{s:02d}", _truth(rng, s)
        for clip in range(CLIPS):
            fc7 = np.maximum(rng.standard_normal(DIM) + 3 * (s % 2), 0).astype(np.float32)
            samples.append({
                "key": schema.sample_key("demo", speaker, f"c{clip}"), "fc7": fc7,
                "meta": {"speaker": speaker, "attributes": truth}, "face_jpg": _face_jpeg(rng),
                "wave": speechlike_wave(rng),
            })
    write_split(folder / split, split, samples, "audio", DIM, samples_per_shard=10)


def make_checkpoint(path, tmp) -> str:
    """A tiny Speech2Face after one training step, saved by a real Trainer."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2 * CLASSES, DIM, generator=generator).relu()
    teacher = tmp / "teacher_head.pt"
    TeacherHead.fit(features, torch.arange(2 * CLASSES) % CLASSES).save(teacher)
    pl.seed_everything(0)
    module = Speech2Face(encoder="tiny", feature_dim=DIM, num_classes=CLASSES, freq_bins=BINS,
                         teacher=str(teacher))
    batches = [{"spec": torch.randn(2, 64, BINS, generator=generator), "fc7": features[i]} for i in range(4)]
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    trainer.fit(module, DataLoader(batches, batch_size=4))
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for i, (split, speakers) in enumerate(SPLIT_SPEAKERS.items()):
        make_split(root / "shards", split, speakers, seed=i)
    ckpt = make_checkpoint(root / "tiny.ckpt", root)
    return {"root": root, "ckpt": ckpt, "test": root / "shards" / "test"}


def save_decoder(path, in_dim: int = DIM) -> str:
    """An untrained tiny FaceDecoderModule checkpoint (32 x 32 faces dlib does not find)."""
    from s2f.decoder_training import FaceDecoderModule

    torch.manual_seed(0)
    module = FaceDecoderModule(preset="tiny", in_dim=in_dim)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def first_run(world):
    out = world["root"] / "out"
    metrics = ev.evaluate(world["ckpt"], world["test"], out, gallery_size=GALLERY, durations=DURATIONS,
                          n_tuples=TUPLES, batch_size=8, device="cpu")
    return {"out": out, "metrics": metrics, "bytes": (out / ev.METRICS_FILE).read_bytes()}


@pytest.fixture(scope="module")
def features(world):
    """The split run through the checkpoint independently of `evaluate`."""
    return ev.embed_split(ev.load_model(world["ckpt"], "cpu"), world["test"], DURATIONS, batch_size=8)


# ----------------------------------------------------------------------------- evaluate


@pytest.mark.slow
def test_cli_rerun_gives_identical_metrics_and_files(world, first_run):
    out = first_run["out"]
    tuples = (out / ev.TUPLE_FILES["random"]).read_bytes()
    argv = ["--ckpt", world["ckpt"], "--shards", str(world["test"]), "--out", str(out),
            "--gallery-size", str(GALLERY), "--durations", "3,6", "--tuples", str(TUPLES),
            "--batch-size", "8", "--device", "cpu"]
    assert ev.main(argv) == 0
    assert (out / ev.METRICS_FILE).read_bytes() == first_run["bytes"]
    assert (out / ev.TUPLE_FILES["random"]).read_bytes() == tuples


@pytest.mark.slow
def test_saved_tuples_are_reused(first_run, features, tmp_path):
    # A saved trial list wins over n_tuples: the run scores exactly the saved trials.
    saved = m.load_tuples(first_run["out"] / ev.TUPLE_FILES["random"])[:50]
    m.save_tuples(tmp_path / ev.TUPLE_FILES["random"], saved)
    result = ev.matching(features, tmp_path, seed=0, n_tuples=TUPLES)
    assert result["random"]["n_tuples"] == 50
    assert result["same_gender"]["n_tuples"] == TUPLES
    assert (m.load_tuples(tmp_path / ev.TUPLE_FILES["random"]) == saved).all()
    accuracy, low, high = m.matching_accuracy(features.v_s["6s"], features.v_f, saved, "cosine")
    assert result["random"]["durations"]["6s"]["cosine"] == {"accuracy": accuracy, "ci": [low, high]}


@pytest.mark.slow
def test_stale_tuples_are_refused(features, tmp_path):
    bad = np.array([[0, 0, 1]])  # clips 0 and 1 are the same speaker: no impostor
    m.save_tuples(tmp_path / ev.TUPLE_FILES["random"], bad)
    with pytest.raises(ValueError, match="do not fit this split"):
        ev.matching(features, tmp_path, seed=0, n_tuples=TUPLES)


@pytest.mark.slow
def test_metrics_agree_with_s2f_metrics_on_the_same_features(first_run, features):
    metrics, n = first_run["metrics"], len(features.keys)
    gallery = m.sample_gallery(n, GALLERY, 0)
    assert metrics["data"] == {"items": 24, "speakers": 6, "skipped": []}
    for label in ("3s", "6s"):
        v_s, v_f, ids = features.v_s[label][gallery], features.v_f[gallery], features.speakers[gallery]
        assert metrics["similarity"][label] == pytest.approx(m.feature_similarity(features.v_s[label], features.v_f))
        for metric in m.METRICS:
            expected = m.retrieval_recall(v_s, v_f, metric=metric)
            got = {k: v["value"] for k, v in metrics["retrieval"][label][metric].items()}
            assert got == pytest.approx(expected)
            identity = m.identity_recall(v_s, v_f, ids, ids, metric=metric)
            assert {k: v["value"] for k, v in metrics["identity_retrieval"][label][metric].items()} == pytest.approx(identity)
            for k, entry in metrics["retrieval"][label][metric].items():
                assert entry["ci"][0] <= entry["value"] <= entry["ci"][1]
        assert metrics["retrieval"][label]["chance"] == {f"recall@{k}": k / GALLERY for k in m.DEFAULT_KS}
        assert metrics["identity_retrieval"][label]["chance"] == pytest.approx(m.identity_chance_recall(ids, ids))


@pytest.mark.slow
def test_matching_scores_the_saved_trials(first_run, features):
    out, metrics = first_run["out"], first_run["metrics"]
    for kind, file in ev.TUPLE_FILES.items():
        table = m.load_tuples(out / file)
        accuracy, low, high = m.matching_accuracy(features.v_s["6s"], features.v_f, table, "cosine")
        assert metrics["matching"][kind]["durations"]["6s"]["cosine"] == {"accuracy": accuracy, "ci": [low, high]}
    genders = ev.label_column(features.attributes, "gender")
    same = m.load_tuples(out / ev.TUPLE_FILES["same_gender"])
    assert (genders[same[:, 0]] == genders[same[:, 2]]).all()


@pytest.mark.slow
def test_oracle_uses_every_voice_side_truth(first_run):
    oracle = first_run["metrics"]["oracle"]
    assert oracle["fields"] == ["gender", "language", "age", "vocal_tract_length", "f0_hz"]
    assert oracle["n_train"] == SPLIT_SPEAKERS["train"] * CLIPS
    retrieval = first_run["metrics"]["retrieval"]["6s"]["cosine"]
    for k in ("recall@1", "recall@5", "recall@10"):
        best = oracle["recall"][k]["value"]
        assert 0 < best <= 1
        assert oracle["ratio"]["6s"]["cosine"][k] == pytest.approx(retrieval[k]["value"] / best)


def test_oracle_columns_one_hot_then_numbers_and_only_fields_known_everywhere():
    truths = [{"gender": "male", "language": "en", "age": 30, "f0_hz": 110.0, "nationality": "UK"},
              {"gender": "female", "language": "es", "age": 50, "f0_hz": 200.0},
              {"gender": "male", "language": "en", "age": 40, "f0_hz": 120.0, "vocal_tract_length": 17.0}]
    columns, fields = ev.oracle_columns(truths)
    assert fields == ["gender", "language", "age", "f0_hz"]  # nationality and VTL are not known for all
    # gender female/male, language en/es, age, f0_hz
    expected = [[0, 1, 1, 0, 30, 110], [1, 0, 0, 1, 50, 200], [0, 1, 1, 0, 40, 120]]
    np.testing.assert_array_equal(columns, expected)
    assert ev.oracle_columns([{"origin": "north"}]) is None


def test_oracle_features_recover_a_linear_map():
    # Teacher features that are an exact linear function of the columns: the ridge map recovers
    # them on new items to within its small shrinkage.
    rng = np.random.default_rng(0)
    x_train, x_new = rng.normal(size=(200, 3)), rng.normal(size=(20, 3))
    weights, bias = rng.normal(size=(3, 8)), rng.normal(size=8)
    predicted = ev.oracle_features(x_train, x_train @ weights + bias, x_new)
    np.testing.assert_allclose(predicted, x_new @ weights + bias, rtol=0.01, atol=0.01)


def test_oracle_retrieves_faces_that_follow_the_voice_truths():
    # Faces whose features follow (age, F0) exactly: the oracle ranks every query's own face first.
    rng = np.random.default_rng(1)
    direction = rng.normal(size=(3, 6))

    def truths(n):
        ages, f0s = rng.integers(18, 80, n), rng.uniform(90, 250, n)
        return [{"age": int(a), "f0_hz": float(f)} for a, f in zip(ages, f0s)]

    def faces(items):  # (N, 6)
        return np.array([[1.0, t["age"] / 80, t["f0_hz"] / 250] for t in items]) @ direction

    train, test = truths(50), truths(12)
    v_f = torch.tensor(faces(test), dtype=torch.float32)
    split = ev.SplitFeatures(keys=[f"k{i}" for i in range(12)], speakers=np.arange(12).astype(str),
                             v_f=v_f, v_s={}, attributes=test, skipped=[])
    evaluation = ev.Evaluation(split, shards=None, train_shards=None)
    evaluation.training_faces = (train, faces(train))  # the cached training split, given directly
    found = ev.oracle(evaluation, np.arange(12), {}, seed=0)
    assert found["fields"] == ["age", "f0_hz"] and found["n_train"] == 50
    assert found["recall"]["recall@1"]["value"] == 1.0


@pytest.mark.slow
def test_attribute_probes_and_groups(first_run):
    metrics = first_run["metrics"]
    probes = metrics["attributes"]["linear_probe"]
    assert set(probes) == {"gender", "age_decade", "origin"}
    for entry in probes.values():
        assert entry["n_train"] == SPLIT_SPEAKERS["train"] * CLIPS
        agreement = entry["durations"]["6s"]
        assert set(agreement) >= {"classes", "truth_vs_prediction", "truth_vs_reference", "reference_vs_prediction"}
    # fc7 is shifted by gender, so a probe fitted on training faces reads gender from true faces.
    assert probes["gender"]["durations"]["6s"]["truth_vs_reference"]["accuracy"] == 1.0
    groups = metrics["groups"]["6s"]
    assert set(groups) == {"gender", "age_group", "origin"}
    assert sum(n for _, n, _ in groups["gender"]["angle"].values()) == GALLERY


@pytest.mark.slow
def test_probe_reader_without_a_training_split(features, tmp_path):
    result = ev.probe_reader(ev.Evaluation(features, tmp_path, tmp_path / "missing"))
    assert "--train-shards" in result["skipped"]


@pytest.mark.slow
def test_report_has_every_section_and_every_image_decodes(first_run):
    page = (first_run["out"] / ev.REPORT_FILE).read_text()
    for name in SECTIONS:
        assert f'<section id="{name}">' in page
    sources = re.findall(r'<img[^>]* src="data:image/(png|jpeg);base64,([^"]+)"', page)
    kinds = {kind for kind, _ in sources}
    assert kinds == {"png", "jpeg"}  # figures and the faces of the retrieval grids
    for _, data in sources:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert page.count('class="true"') >= ev.GRID_QUERIES  # every query's true face is marked
    assert "5,000-face AVSpeech gallery" in page


@pytest.mark.slow
def test_report_renders_from_metrics_json_alone(first_run, tmp_path):
    metrics = json.loads(first_run["bytes"])
    page = render_report(metrics, {}, tmp_path / "report.html").read_text()
    assert all(f'<section id="{name}">' in page for name in SECTIONS)
    assert "<th>R@1 %</th><th>R@2 %</th><th>R@5 %</th><th>R@10 %</th>" in page  # k order survives JSON


def test_durations_longer_than_the_clips_are_refused():
    with pytest.raises(ValueError, match="duration 7"):
        ev.clip_frames(7.0)
    assert ev.clip_frames(3.0) == 298 and ev.clip_frames(6.0) == 598


# ----------------------------------------------------------------------------- callback


class RecordingConfig(dict):
    def update(self, values: dict, allow_val_change: bool = False) -> None:
        super().update(values)


class RecordingRun:
    """Stands in for a wandb run (no wandb process): records what the logger sends."""

    def __init__(self, folder):
        self.id = self.name = "recording"
        self.dir = str(folder)
        self.config = RecordingConfig()
        self.logged: list[dict] = []

    def log(self, data: dict, step: int | None = None) -> None:
        self.logged.append(data)

    def define_metric(self, *args, **kwargs) -> None:
        pass


def _validation_batches(features: ev.SplitFeatures, world, with_faces: bool) -> list[dict]:
    """The test split as batches with spectrograms and keys (and face.jpg bytes if asked)."""
    faces = ev.read_faces(world["test"], features.keys)
    samples = list(ev._samples(world["test"], True, []))
    spec = ev._batch_spectrogram(samples, "cpu")  # (N, 2, 598, 257)
    batches = []
    for i in range(0, len(samples), 5):
        keys = features.keys[i : i + 5]
        extra = {"face": [faces[k] for k in keys]} if with_faces else {}
        batches.append({"spec": spec[i : i + 5], "fc7": features.v_f[i : i + 5], "key": keys, **extra})
    return batches


@pytest.mark.slow
@pytest.mark.parametrize("faces_in_batch", [True, False])
def test_callback_logs_retrieval_metrics_and_a_grid(world, features, tmp_path, faces_in_batch):
    module = Speech2Face.load_from_checkpoint(world["ckpt"], weights_only=True)
    batches = _validation_batches(features, world, faces_in_batch)
    run = RecordingRun(tmp_path)
    # Without faces in the batches, the callback reads them from the split by key.
    callback = RetrievalMetrics(max_items=20, ks=(1, 5), face_shards=None if faces_in_batch else str(world["test"]))
    trainer = pl.Trainer(accelerator="cpu", logger=WandbLogger(experiment=run, save_dir=tmp_path),
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    metrics = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    v_s, v_f = features.v_s["6s"][:20], features.v_f[:20]  # the cap keeps the first 20 clips
    expected = m.retrieval_recall(v_s, v_f, ks=(1, 5))
    assert metrics["val_retrieval/gallery"] == 20
    assert metrics["val_retrieval/recall@1"] == pytest.approx(expected["recall@1"])
    assert metrics["val_retrieval/recall@5"] == pytest.approx(expected["recall@5"])
    assert metrics["val_retrieval/chance@5"] == pytest.approx(5 / 20)
    assert metrics["val_retrieval/angle"] == pytest.approx(m.angles_deg(v_s, v_f).mean().item(), rel=1e-5)
    grids = [entry["val_retrieval/grid"] for entry in run.logged if "val_retrieval/grid" in entry]
    assert len(grids) == 1 and grids[0][0].image.size == (6 * 96, 4 * 96)


class RankShare(torch.utils.data.IterableDataset):
    """Batch i goes to rank i % 2: with an odd batch count the ranks hold different numbers of clips."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return iter(self.batches[rank::2])


@pytest.mark.slow
def test_callback_gathers_uneven_ranks(world, features, tmp_path):
    module = Speech2Face.load_from_checkpoint(world["ckpt"], weights_only=True)
    batches = _validation_batches(features, world, with_faces=True)  # 5 batches: 14 + 10 clips
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", use_distributed_sampler=False,
                         logger=WandbLogger(experiment=RecordingRun(tmp_path), save_dir=tmp_path),
                         callbacks=[RetrievalMetrics(ks=(1, 5))], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    metrics = trainer.validate(module, DataLoader(RankShare(batches), batch_size=None), verbose=False)[0]
    expected = m.retrieval_recall(features.v_s["6s"], features.v_f, ks=(1, 5))  # order-free
    assert metrics["val_retrieval/gallery"] == len(features.keys)
    assert metrics["val_retrieval/recall@5"] == pytest.approx(expected["recall@5"])


# ----------------------------------------------------------------------------- reader (b)


def test_agegender_reader_needs_a_decoder(features, world):
    result = ev.agegender_reader(ev.Evaluation(features, world["test"], None))
    assert "--decoder" in result["skipped"]


@pytest.mark.slow
def test_agegender_reader_on_decoded_faces(features, world, faceapi_cache, tmp_path):
    from s2f.agegender import AgeGenderNet
    from s2f.decoder_training import load_decoder

    path = save_decoder(tmp_path / "decoder.ckpt")
    result = ev.agegender_reader(ev.Evaluation(features, world["test"], None, decoder=path))
    net, decoder = AgeGenderNet.load(), load_decoder(path)
    jpegs = ev.read_faces(world["test"], features.keys)
    originals = net.predict([np.asarray(Image.open(io.BytesIO(jpegs[k])).convert("RGB")) for k in features.keys])
    for label, v_s in features.v_s.items():
        with torch.no_grad():
            images = decoder(v_s.float())["image"].clamp(0, 1)
        decoded = net.predict(list((images * 255).round().byte().permute(0, 2, 3, 1).numpy()))
        gender = result["gender"]["durations"][label]
        classes = gender["classes"]
        expected = np.zeros((len(classes), len(classes)), int)
        for ref, pred in zip(originals.gender, decoded.gender):
            expected[classes.index(ref), classes.index(pred)] += 1
        assert gender["reference_vs_prediction"]["confusion"] == expected.tolist()
        assert gender["reference_vs_prediction"]["n"] == len(features.keys)
        assert "truth_vs_reference" in gender  # the fixture's faces carry a true gender


# ----------------------------------------------------------------------------- decoded faces


@pytest.fixture(scope="module")
def decoder_run(world):
    out = world["root"] / "out-decoder"
    decoder = save_decoder(world["root"] / "decoder.ckpt")
    metrics = ev.evaluate(world["ckpt"], world["test"], out, gallery_size=GALLERY, durations=DURATIONS,
                          n_tuples=TUPLES, batch_size=8, device="cpu", readers={}, decoder=decoder)
    return {"out": out, "metrics": metrics}


@pytest.mark.slow
def test_faces_section_counts_every_decoded_face(decoder_run):
    from s2f.craniofacial import MEASUREMENTS

    faces = decoder_run["metrics"]["faces"]
    items = SPLIT_SPEAKERS["test"] * CLIPS
    assert faces["items"] == items and faces["image_size"] == 32
    # The fixture's features are synthetic: no face network reads them, so retrieval is skipped.
    assert faces["teacher"] is None and "--face-teacher" in faces["retrieval_skipped"]
    sets = [faces["f2f"], *faces["s2f"].values()]
    assert list(faces["s2f"]) == ["3s", "6s"]
    for entry in sets:
        detection = entry["detection"]
        assert detection["n"] == items and 0 <= detection["rate"] <= 1
        assert 0 <= detection["ci"][0] <= detection["rate"] <= detection["ci"][1] <= 1
        # ground-truth face_width and jaw_width travel in "appearance"
        assert set(entry["true_geometry"]) == {"face_width ~ face_width", "jaw_width ~ jaw_width"}
        assert all(row["n"] <= detection["detected"] for row in entry["true_geometry"].values())
        assert list(entry["drawn_vs_read"]) == list(MEASUREMENTS)
        assert set(entry["true_geometry_drawn"]) == set(entry["true_geometry"])
        assert all(row["n"] == items for row in entry["true_geometry_drawn"].values())  # drawn for all
        assert all(row["n"] <= detection["detected"] for row in entry["drawn_vs_read"].values())
    for entry in faces["s2f"].values():
        assert list(entry["craniofacial"]) == list(MEASUREMENTS)
    # the reference: the fixture's face.jpg crops shrunk to the decoder's 32 px, read the same way
    reference = faces["reference"]
    assert (reference["image_size"], reference["items"]) == (32, items)
    assert reference["detection"]["n"] == items
    assert set(reference["true_geometry"]) == set(faces["f2f"]["true_geometry"])
    assert list(reference["f2f_vs_reference"]) == list(MEASUREMENTS)


@pytest.mark.slow
def test_report_shows_decoded_face_grids_and_tables(decoder_run):
    from s2f.craniofacial import MEASUREMENTS
    from s2f.decoded_faces import GRID_FACES

    page = (decoder_run["out"] / ev.REPORT_FILE).read_text()
    section = re.search(r'<section id="faces">(.*?)</section>', page).group(1)
    grid = re.search(r'<div class="faces">(.*?)</div>', section).group(1)
    sources = re.findall(r'<img[^>]* src="data:image/(png|jpeg);base64,([^"]+)"', grid)
    assert [kind for kind, _ in sources] == ["jpeg", "png", "png"] * GRID_FACES  # true | F2F | S2F
    for _, data in sources:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    for label in ("3s", "6s"):
        assert f"Craniofacial: F2F vs S2F {label}" in section
    assert all(f"<td>{name}</td>" in section for name in MEASUREMENTS)
    assert "True face geometry vs measurements on F2F" in section
    assert "F2F: the geometry the decoder drew" in section
    assert "True face geometry vs measurements on the landmarks the decoder drew F2F with" in section
    assert "Retrieval of decoded faces not run" in section
    assert "Reference: each clip's true target face" in section
    assert "F2F vs the true faces at 32 px" in section
    assert "True face geometry vs measurements on the true faces at 32 px" in section
    assert "<th>r: 95% CI over speakers</th>" in section


def test_correlation_table_shows_the_interval_over_speakers():
    from s2f.report import _correlation_table

    baseline = {"mean": 0.01, "std": 0.1, "p_value": 0.002}
    page = _correlation_table({
        "face_width ~ face_width": {"r": 0.56, "p": 1e-9, "n": 136, "baseline": baseline, "ci": [0.31, 0.74]},
        "nose_width ~ nose_width": {"r": 0.7, "p": 1e-20, "n": 136, "baseline": baseline},  # no speakers
        "jaw_width ~ jaw_width": {"r": None, "p": None, "n": 2, "baseline": None, "error": "too few"},
    }, "true field ~ measurement", "caption")  # fmt: skip
    cells = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>", page)
    assert cells == [("face_width ~ face_width", "+0.560", "[+0.31, +0.74]"),
                     ("nose_width ~ nose_width", "+0.700", "–"), ("jaw_width ~ jaw_width", "–", "–")]


def _image_bytes(colour: tuple[int, int, int], kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format=kind)
    return buffer.getvalue()


def test_decoded_face_grid_adds_a_portrait_column_when_the_shards_have_portraits():
    from s2f.report import _face_grid

    face, portrait = _image_bytes((200, 0, 0), "JPEG"), _image_bytes((0, 0, 200), "JPEG")
    decoded = _image_bytes((0, 200, 0), "PNG")
    rows = [{"key": f"k{i}", "true": face, "portrait": portrait if i == 0 else None, "f2f": decoded,
             "s2f": decoded, "f2f_detected": True, "s2f_detected": True} for i in range(2)]  # fmt: skip
    page = _face_grid({"duration": "6s", "rows": rows})
    assert "<th>true face</th><th>portrait</th><th>F2F</th><th>S2F</th>" in page
    images = re.findall(r'src="data:image/(png|jpeg);base64,([^"]+)"', page)
    assert [base64.b64decode(data) for _, data in images] == [face, portrait, decoded, decoded, face, decoded, decoded]
    assert "k1<br>(no portrait.jpg)" in page
    page = _face_grid({"duration": "6s", "rows": [{**row, "portrait": None} for row in rows]})
    assert "portrait" not in page and "<th>true face</th><th>F2F</th><th>S2F</th>" in page


@pytest.mark.slow
def test_report_without_decoder_says_how_to_get_faces(first_run):
    page = (first_run["out"] / ev.REPORT_FILE).read_text()
    assert "faces" not in first_run["metrics"]
    assert "--decoder" in re.search(r'<section id="faces">(.*?)</section>', page).group(1)


def test_decoder_and_face_teacher_must_fit_the_shards(world, tmp_path):
    from s2f.decoded_faces import FaceStage

    with pytest.raises(ValueError, match="--decoder .* decodes 128-D features, but .* 16-D"):
        FaceStage.load(save_decoder(tmp_path / "wide.ckpt", in_dim=128), None, world["test"])
    with pytest.raises(ValueError, match="--face-teacher dlib: gives 128-D features"):
        FaceStage.load(save_decoder(tmp_path / "fits.ckpt"), "dlib", world["test"])
