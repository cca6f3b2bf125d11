import numpy as np
import pytest
import torch
from torch import nn

from s2f.loss import Speech2FaceLoss


def fixed_inputs():
    generator = torch.Generator().manual_seed(3)
    fc8 = nn.Linear(6, 5)
    f_dec = nn.Linear(6, 4)
    for layer in (fc8, f_dec):
        nn.init.normal_(layer.weight, generator=generator)
        nn.init.normal_(layer.bias, generator=generator)
    v_s = torch.randn(3, 6, generator=generator)
    v_f = torch.randn(3, 6, generator=generator).relu()
    return fc8, f_dec, v_s, v_f


def numpy_reference(fc8, f_dec, v_s, v_f, lambda1=0.025, lambda2=200.0, temperature=2.0):
    """The SPEC formula written per sample with explicit loops in float64."""
    W8, b8 = fc8.weight.detach().double().numpy(), fc8.bias.detach().double().numpy()
    Wd, bd = f_dec.weight.detach().double().numpy(), f_dec.bias.detach().double().numpy()
    dec, feat, distill = [], [], []
    for s, f in zip(v_s.double().numpy(), v_f.double().numpy()):
        dec.append(np.abs((Wd @ f + bd) - (Wd @ s + bd)).sum())
        feat.append(((f / np.linalg.norm(f) - s / np.linalg.norm(s)) ** 2).sum())
        a, b = (W8 @ f + b8) / temperature, (W8 @ s + b8) / temperature
        p = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
        log_q = b - b.max() - np.log(np.exp(b - b.max()).sum())
        distill.append(-(p * log_q).sum())
    dec, feat, distill = np.mean(dec), np.mean(feat), np.mean(distill)
    return {"dec": dec, "feat": feat, "distill": distill,
            "total": dec + lambda1 * feat + lambda2 * distill}


def test_terms_equal_hand_written_reference():
    fc8, f_dec, v_s, v_f = fixed_inputs()
    terms = Speech2FaceLoss(fc8, f_dec)(v_s, v_f)
    reference = numpy_reference(fc8, f_dec, v_s, v_f)
    for name, value in reference.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name


def test_identical_features_leave_only_the_entropy():
    fc8, f_dec, _, v_f = fixed_inputs()
    terms = Speech2FaceLoss(fc8, f_dec)(v_f.clone(), v_f)
    assert terms["dec"].item() == 0.0
    assert terms["feat"].item() == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(fc8(v_f) / 2.0, dim=1)
    entropy = -(p * p.log()).sum(dim=1).mean()
    assert terms["distill"].item() == pytest.approx(entropy.item(), rel=1e-6)


def test_gradients_reach_v_s_only():
    fc8, f_dec, v_s, v_f = fixed_inputs()
    v_s.requires_grad_(True)
    v_f.requires_grad_(True)
    loss = Speech2FaceLoss(fc8, f_dec)
    loss(v_s, v_f)["total"].backward()
    assert v_s.grad is not None and v_s.grad.abs().sum() > 0
    assert v_f.grad is None
    assert all(p.grad is None and not p.requires_grad for p in [*fc8.parameters(), *f_dec.parameters()])


def test_no_decoder_means_zero_dec_term_said_once(caplog):
    fc8, _, v_s, v_f = fixed_inputs()
    loss = Speech2FaceLoss(fc8)
    with caplog.at_level("INFO", logger="s2f.loss"):
        first, second = loss(v_s, v_f), loss(v_s, v_f)
    assert first["dec"].item() == 0.0 and second["dec"].item() == 0.0
    assert sum("no face decoder" in r.message for r in caplog.records) == 1
    reference = numpy_reference(fc8, nn.Linear(6, 4), v_s, v_f)
    assert first["total"].item() == pytest.approx(
        0.025 * reference["feat"] + 200 * reference["distill"], rel=1e-5
    )
