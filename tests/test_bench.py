"""`s2f bench`: structure of the training figures (not speed), the LR rule, the scaling model."""

import json
import math

import pytest
import torch

from s2f import bench
from s2f.bench import (PHASES, TrainBench, allreduce_seconds, bench_train, gradient_buckets, peak_tflops,
                       predict_scaling, step_flops)
from s2f.module import scaled_lr_schedule
from tests.shard_factory import make_shards, round_robin_assignment

TINY = dict(preset="tiny", batch_size=2, precision="32", steps=2, warmup=1, device="cpu", feature_dim=16)


def check_figures(result: bench.TrainResult, feature_dim: int, frames: int) -> None:
    assert set(result.phase_s) == set(PHASES)
    assert all(seconds > 0 for seconds in result.phase_s.values())
    # The phases tile the timed steps: their sum is the wall step time up to the clock's overhead.
    assert 0.8 * result.step_s <= sum(result.phase_s.values()) <= result.step_s
    assert result.samples_per_s == pytest.approx(result.settings["batch_size"] / result.step_s)
    flops = step_flops("tiny", feature_dim, 2622, frames, 257)
    assert result.train_flops_per_sample == flops.training > 2 * result.forward_flops_per_sample > 0
    assert result.achieved_tflops == pytest.approx(flops.training * result.samples_per_s / 1e12)
    assert result.mfu is None and result.peak_tflops is None  # no CPU peak in the table
    assert result.peak_memory_bytes > 0 and result.device_name == "cpu"


@pytest.mark.slow
def test_synthetic_cpu_run():
    result = bench_train(TrainBench(**TINY, frames=32, fused_adam=True, channels_last=True))
    check_figures(result, feature_dim=16, frames=32)
    assert result.optimizer == "Adam (fused)"
    assert (result.scaled_lr, result.scaled_decay_steps) == scaled_lr_schedule(2)


@pytest.mark.slow
def test_shards_cpu_run(tmp_path):
    # 2 train speakers x 2 clips = 4 samples: 3 batches of 2 run into a second epoch.
    root = make_shards(tmp_path, speakers=4, clips_per_speaker=2, feature_dim=16, payload="audio",
                       samples_per_shard=2, assignment=round_robin_assignment(4))
    result = bench_train(TrainBench(**TINY, mode="shards", shards=str(root), workers=0))
    check_figures(result, feature_dim=16, frames=598)
    assert result.optimizer == "Adam (not fused)"


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["train", "--preset", "tiny", "--batch-size", "1", "--precision", "32", "--steps", "1",
            "--warmup", "0", "--device", "cpu", "--feature-dim", "16", "--frames", "32", "--json", str(out)]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    assert "samples/s" in table and "MFU" in table and "n/a" in table
    saved = json.loads(out.read_text())
    assert saved["best_batch_size"] == 1 and saved["runs"][0]["settings"]["preset"] == "tiny"


def test_settings_errors_name_the_fix():
    with pytest.raises(ValueError, match="--shards DIR"):
        TrainBench(mode="shards")
    with pytest.raises(ValueError, match="--precision"):
        TrainBench(precision="16")


def test_s2f_dispatches_bench_data(monkeypatch):
    import datamodules.bench
    from s2f.cli import main as s2f_main

    seen = []
    monkeypatch.setattr(datamodules.bench, "main", seen.append)
    assert s2f_main(["bench", "data", "--samples", "8"]) == 0
    assert seen == [["--samples", "8"]]


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4), ("NVIDIA H100 PCIe", "bf16-mixed", 756.5),
    ("NVIDIA H100 NVL", "32", 417.5), ("NVIDIA H200", "bf16-mixed", 989.4),
    ("NVIDIA GH200 480GB", "32", 494.7), ("NVIDIA A100-SXM4-80GB", "32", 156.0),
    ("NVIDIA L40S", "bf16-mixed", 362.05), ("NVIDIA L4", "bf16-mixed", 121.0),
    ("NVIDIA A10", "bf16-mixed", 125.0), ("NVIDIA A10G", "bf16-mixed", None),
])
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_lr_rule():
    assert scaled_lr_schedule(8) == (1e-3, 10_000)
    lr, steps = scaled_lr_schedule(32)  # k = 4: lr x 2, a quarter of the steps
    assert lr == pytest.approx(2e-3) and steps == 2_500
    assert scaled_lr_schedule(2)[1] == 40_000
    with pytest.raises(ValueError, match="batch_size=0"):
        scaled_lr_schedule(0)


def test_allreduce_by_hand():
    assert allreduce_seconds(1e8, 1, 5e10, 1e-5) == 0.0
    assert allreduce_seconds(1e8, 8, 5e10, 1e-5) == pytest.approx(1e-5 + 2 * 7 / 8 * 1e8 / 5e10)


def test_buckets_close_at_the_cap():
    # bytes 4 per gradient: 10 + 10 params reach 80 B -> one bucket; 30 params alone exceed it.
    assert gradient_buckets([(10, 1), (10, 1), (30, 1), (5, 1)], 4, 80) == [
        (80, 0.5), (120, 0.75), (20, 1.0)]


def test_predict_scaling_without_overlap_by_hand():
    # 1e8 params x 2 B over 4 GPUs at 100 GB/s: 2 x 3/4 x 2e8 / 1e11 = 3 ms, all exposed.
    point = predict_scaling(0.1, 100_000_000, 4, 1e11, latency_s=0.0, bucket_bytes=math.inf, overlap=False)
    assert point.comm_s == pytest.approx(0.003) and point.exposed_s == pytest.approx(0.003)
    assert point.efficiency == pytest.approx(0.1 / 0.103)
    accumulated = predict_scaling(0.1, 100_000_000, 4, 1e11, latency_s=0.0, bucket_bytes=math.inf,
                                  overlap=False, accumulation=4)
    assert accumulated.step_s == pytest.approx(0.403) and accumulated.efficiency == pytest.approx(0.4 / 0.403)
    assert accumulated.speedup == pytest.approx(4 * 0.4 / 0.403)


def test_predict_scaling_overlap_by_hand():
    # Two 1e8-byte buckets, the first ready at the start of backward (0.05 s), the second at its end:
    # the first (1.5 ms) hides, the second is exposed.
    profile = [(50_000_000, 0.0), (50_000_000, 1.0)]
    point = predict_scaling(0.1, 100_000_000, 4, 1e11, latency_s=0.0, bucket_bytes=1e8,
                            backward_fraction=0.5, profile=profile)
    assert point.comm_s == pytest.approx(0.003) and point.exposed_s == pytest.approx(0.0015)
    assert point.efficiency == pytest.approx(0.1 / 0.1015)


def test_paper_profile_and_scaling_cli(capsys):
    params, profile, count = bench.encoder_profile("paper")
    assert params == sum(n for n, _ in profile) == 164_840_192
    assert sum(share for _, share in profile) == count.total  # every counted layer once
    assert bench.main(["scaling", "--step-time", "0.0125", "--accumulation", "1", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 node NVLink" in out and "2 nodes 400G" in out and "PREDICTED" not in out


def write_landmarks(root, count: int = 6) -> None:
    """root/train/landmarks68.npz as the landmark pass writes it: jittered mean faces."""
    import numpy as np

    from s2f.decoder import default_mean_landmarks

    rng = np.random.default_rng(0)
    points = default_mean_landmarks().numpy() + 0.01 * rng.standard_normal((count, 68, 2))
    (root / "train").mkdir(parents=True)
    np.savez(root / "train" / "landmarks68.npz", keys=np.array([f"k{i}" for i in range(count)]),
             landmarks=points.astype(np.float32), mean=points.mean(0).astype(np.float32))  # fmt: skip


def test_warp_bench_prints_both_strides_and_their_agreement(tmp_path, capsys):
    from s2f.cli import main as s2f_main
    from s2f.decoder import FLOW_STRIDE

    write_landmarks(tmp_path)
    args = ["bench", "warp", "--shards", str(tmp_path), "--size", "32", "--batch-size", "8",
            "--repeats", "1"]  # fmt: skip
    assert s2f_main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {int(line.split()[0]): line.split()[1:] for line in lines[2:4]}
    assert set(rows) == {1, FLOW_STRIDE} and all(float(v) > 0 for row in rows.values() for v in row)
    assert lines[4].startswith("speed-up: warp ")
    warp_db, unwarp_db = (float(part.split()[-2]) for part in lines[6].split(":")[1].split(","))
    assert warp_db > 40 and unwarp_db > 40  # 8 faces with 0.01 jitter: ~50 dB


def test_warp_bench_without_landmarks_names_the_fix(tmp_path, capsys):
    from s2f.warp_bench import main

    with pytest.raises(SystemExit):
        main(["--shards", str(tmp_path)])
    assert "configs/decoder-demo.yaml" in capsys.readouterr().err
