import pytest
import torch
import torch.nn.functional as F

from s2f.teacher import (
    VGGFACE_CONVS,
    VGGFACE_RGB_MEAN,
    TeacherHead,
    TeacherLoadError,
    VGGFace,
    load_classifier,
)


def random_vgg_face_dag_state(seed: int = 0) -> dict:
    """A state dict in the vgg_face_dag.pth layout, written out independently of VGGFace."""
    generator = torch.Generator().manual_seed(seed)
    state, in_channels = {}, 3
    for entry in VGGFACE_CONVS:
        if entry == "pool":
            continue
        name, out = entry
        state[f"{name}.weight"] = torch.randn(out, in_channels, 3, 3, generator=generator) * (2 / (9 * in_channels)) ** 0.5
        state[f"{name}.bias"] = torch.randn(out, generator=generator) * 0.01
        in_channels = out
    for name, (n_in, n_out) in {"fc6": (25088, 4096), "fc7": (4096, 4096), "fc8": (4096, 2622)}.items():
        state[f"{name}.weight"] = torch.randn(n_out, n_in, generator=generator) * (2 / n_in) ** 0.5
        state[f"{name}.bias"] = torch.randn(n_out, generator=generator) * 0.01
    return state


def functional_vgg_face(state: dict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = images - torch.tensor(VGGFACE_RGB_MEAN).view(1, 3, 1, 1)
    for entry in VGGFACE_CONVS:
        if entry == "pool":
            x = F.max_pool2d(x, 2)
        else:
            x = F.relu(F.conv2d(x, state[f"{entry[0]}.weight"], state[f"{entry[0]}.bias"], padding=1))
    x = F.relu(F.linear(x.flatten(1), state["fc6.weight"], state["fc6.bias"]))
    fc7 = F.relu(F.linear(x, state["fc7.weight"], state["fc7.bias"]))
    return fc7, F.linear(fc7, state["fc8.weight"], state["fc8.bias"])


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    state = random_vgg_face_dag_state()
    path = tmp_path_factory.mktemp("vgg") / "vgg_face_dag.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.slow
def test_vggface_round_trip_equals_functional(vgg_file):
    path, state = vgg_file
    model = VGGFace.load(path)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        fc7 = model(images)
        logits = model.fc8(fc7)
    ref_fc7, ref_logits = functional_vgg_face(state, images)
    assert fc7.shape == (2, 4096) and (fc7 >= 0).all()
    torch.testing.assert_close(fc7, ref_fc7, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert load_classifier(path).weight.shape == (2622, 4096)


@pytest.mark.slow
def test_vggface_load_is_strict(vgg_file, tmp_path):
    _, state = vgg_file
    missing = dict(state)
    del missing["conv3_2.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(TeacherLoadError, match="conv3_2.bias"):
        VGGFace.load(tmp_path / "missing.pth")
    extra = dict(state, **{"fc9.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(TeacherLoadError, match="fc9.weight"):
        VGGFace.load(tmp_path / "extra.pth")
    wrong = dict(state, **{"fc8.bias": torch.zeros(1000)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(TeacherLoadError, match="fc8.bias"):
        VGGFace.load(tmp_path / "wrong.pth")


def clusters(seed=0, classes=5, per_class=20, dim=16):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 3
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator) * 0.5, labels


def test_teacher_head_fits_deterministically_and_round_trips(tmp_path):
    features, labels = clusters()
    head = TeacherHead.fit(features, labels)
    again = TeacherHead.fit(features, labels)
    assert torch.equal(head.linear.weight, again.linear.weight)
    assert (head(features).argmax(1) == labels).float().mean() == 1.0
    assert not any(p.requires_grad for p in head.parameters())
    head.save(tmp_path / "teacher_head.pt")
    loaded = TeacherHead.load(tmp_path / "teacher_head.pt")
    assert (loaded.feature_dim, loaded.num_classes) == (16, 5)
    torch.testing.assert_close(loaded(features), head(features))
    assert load_classifier(tmp_path / "teacher_head.pt").out_features == 5
    with pytest.raises(TeacherLoadError, match="nowhere.pt"):
        load_classifier(tmp_path / "nowhere.pt")
