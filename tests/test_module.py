import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from s2f.metrics import angles_deg
from s2f.module import Speech2Face
from s2f.teacher import TeacherHead

# D < classes: the teacher's logits then pin v_s down, as VGG-Face's 2,622 classes do in practice.
PAIRS, FRAMES, BINS, DIM, CLASSES = 16, 32, 64, 16, 48
STEPS = 250  # ends near 6 deg; 150 steps ended under 20 deg on one CPU and at 26 on another


class FixedPairs(Dataset):
    """16 fixed (spectrogram, feature) pairs; features are non-negative like post-ReLU fc7.

    `identity_features` (2 per identity) train the teacher head; the pairs use the first 16.
    """

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.spec = torch.randn(PAIRS, 2, FRAMES, BINS, generator=generator)
        self.identity_features = torch.randn(2 * CLASSES, DIM, generator=generator).relu()
        self.fc7 = self.identity_features[:PAIRS]

    def __len__(self):
        return PAIRS

    def __getitem__(self, i):
        return {"spec": self.spec[i], "fc7": self.fc7[i]}


def teacher_file(tmp_path, pairs: FixedPairs):
    labels = torch.arange(2 * CLASSES) % CLASSES
    path = tmp_path / "teacher_head.pt"
    # Soft teacher logits (strong L2), like a classifier trained on far more identities.
    TeacherHead.fit(pairs.identity_features, labels, weight_decay=1e-4).save(path)
    return str(path)


def make_module(tmp_path, pairs):
    return Speech2Face(
        encoder="tiny", feature_dim=DIM, num_classes=CLASSES, freq_bins=BINS,
        teacher=teacher_file(tmp_path, pairs),
    )


def mean_angle(module, pairs) -> float:
    module.eval()
    with torch.no_grad():
        return angles_deg(module(pairs.spec), pairs.fc7).mean().item()


def test_module_overfits_sixteen_pairs(tmp_path):
    pl.seed_everything(0)
    pairs = FixedPairs()
    module = make_module(tmp_path, pairs)
    before = mean_angle(module, pairs)
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(pairs, batch_size=PAIRS, shuffle=False))
    after = mean_angle(module, pairs)
    assert before > 45
    assert after < 20, f"mean angle {after:.1f} deg after {STEPS} steps (from {before:.1f})"
    assert set(trainer.logged_metrics) >= {"train/total", "train/dec", "train/feat", "train/distill", "train/lr"}


def test_validation_metrics_over_the_whole_split(tmp_path):
    pairs = FixedPairs()
    module = make_module(tmp_path, pairs)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    metrics = trainer.validate(module, DataLoader(pairs, batch_size=5), verbose=False)[0]
    assert metrics["val/samples"] == PAIRS  # four batches gathered into one gallery
    module.eval()
    with torch.no_grad():
        v_s = module(pairs.spec)
    assert metrics["val/angle"] == torch.tensor(angles_deg(v_s, pairs.fc7).mean().item()).float().item()
    sims = torch.nn.functional.normalize(v_s, dim=1) @ torch.nn.functional.normalize(pairs.fc7, dim=1).T
    rank = (sims > sims.diag()[:, None]).sum(1) + 1
    assert metrics["val/recall@5"] == (rank <= 5).float().mean().item()


def test_checkpoint_alone_rebuilds_the_module(tmp_path):
    pairs = FixedPairs()
    module = make_module(tmp_path, pairs)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, DataLoader(pairs, batch_size=8))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    (tmp_path / "teacher_head.pt").unlink()  # the checkpoint must not need it
    restored = Speech2Face.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    module.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(pairs.spec), module(pairs.spec))
    torch.testing.assert_close(restored.loss.fc8.weight, module.loss.fc8.weight)
    assert restored.hparams.encoder == "tiny" and restored.hparams.lr == 1e-3


def test_training_without_teacher_fails_naming_the_key(tmp_path):
    module = Speech2Face(encoder="tiny", feature_dim=DIM, num_classes=CLASSES, freq_bins=BINS)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)
    try:
        trainer.fit(module, DataLoader(FixedPairs(), batch_size=8))
    except ValueError as error:
        assert "model.teacher" in str(error)
    else:
        raise AssertionError("training without a teacher must fail")


def test_paper_optimiser_defaults():
    module = Speech2Face(encoder="tiny", feature_dim=DIM, num_classes=CLASSES)
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (1e-3, (0.5, 0.999), 1e-4)
    assert (schedule.step_size, schedule.gamma, config["lr_scheduler"]["interval"]) == (10_000, 0.95, "step")


def test_waveform_batches_get_their_spectrogram():
    wav = torch.randn(2, 16_000)
    spec = Speech2Face.batch_spectrogram({"wav": wav})
    assert spec.shape == (2, 2, 98, 257)


def test_decoder_first_layer_becomes_the_frozen_f_dec(tmp_path):
    from s2f.decoder_training import FaceDecoderModule, load_decoder

    decoder_module = FaceDecoderModule(preset="tiny", in_dim=DIM)
    path = tmp_path / "decoder.ckpt"
    torch.save({"hyper_parameters": dict(decoder_module.hparams), "state_dict": decoder_module.state_dict()}, path)
    first = load_decoder(path).first
    pairs = FixedPairs()
    module = Speech2Face(encoder="tiny", feature_dim=DIM, num_classes=CLASSES, freq_bins=BINS,
                         teacher=teacher_file(tmp_path, pairs), decoder_ckpt=str(path),
                         decoder_dim=first.out_features)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0)
    trainer.fit(module, DataLoader(pairs, batch_size=8))
    torch.testing.assert_close(module.loss.f_dec.weight, first.weight)  # loaded, and never trained
    assert not module.loss.f_dec.weight.requires_grad
    assert trainer.logged_metrics["train/dec"] > 0
    wrong = Speech2Face(encoder="tiny", feature_dim=DIM, num_classes=CLASSES, freq_bins=BINS,
                        teacher=teacher_file(tmp_path, pairs), decoder_ckpt=str(path), decoder_dim=999)
    try:
        pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                   default_root_dir=tmp_path).fit(wrong, DataLoader(pairs, batch_size=8))
    except ValueError as error:
        assert "model.decoder_dim=999" in str(error)
    else:
        raise AssertionError("a decoder of another width must be refused")


def test_training_window_and_channels_last():
    module = Speech2Face(encoder="tiny", feature_dim=DIM, num_classes=CLASSES, train_seconds=1.0,
                         channels_last=True)
    spec = torch.randn(2, 2, 598, 257)
    window = module.training_window(spec)
    assert window.shape == (2, 2, 98, 257)  # 1 s = 16,000 samples = 98 frames
    start = next(s for s in range(598 - 97) if torch.equal(spec[:, :, s : s + 98], window))
    assert 0 <= start <= 500
    module.setup("validate")
    assert module.encoder.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    module.eval()
    reference = Speech2Face(encoder="tiny", feature_dim=DIM, num_classes=CLASSES).eval()
    reference.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(module(spec), reference(spec), rtol=1e-4, atol=1e-4)


def test_linear_schedule_reaches_zero_at_the_last_step(tmp_path):
    pairs = FixedPairs()
    module = Speech2Face(encoder="tiny", feature_dim=DIM, num_classes=CLASSES, freq_bins=BINS,
                         teacher=teacher_file(tmp_path, pairs), schedule="linear")
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0)
    trainer.fit(module, DataLoader(pairs, batch_size=8))
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == 0.0


def test_compile_option_compiles_the_encoder_in_place():
    module = Speech2Face(encoder="tiny", feature_dim=DIM, num_classes=CLASSES, compile=True)
    keys = set(module.state_dict())
    module.setup("validate")
    assert module.encoder._compiled_call_impl is not None  # compiled on its first call
    assert set(module.state_dict()) == keys  # checkpoints keep their keys
