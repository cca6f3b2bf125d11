"""Warp benchmark: the decoder's thin-plate warp with the spline evaluated at every pixel
(stride 1) and on the lattice (`FLOW_STRIDE`), side by side in one run.

    s2f bench warp [--shards runs/demo/shards] [--size 64] [--batch-size 32] [--repeats 10]

Landmarks are dlib's, read from the shards' train split (`landmarks68.npz`, written by the
decoder's first `s2f fit`), warped from the split's mean shape. Printed per stride: the time of
one warp forward + backward (the decoder's step) and of one unwarp (the DataLoader's target),
and how far the lattice's grid and images are from the every-pixel ones: grid deviation in
pixels (median, 99th percentile, max) and PSNR of the warped and unwarped images.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence

import torch

from s2f.decoder import FLOW_STRIDE, tps_flow, unwarp, warp

DEFAULT_SHARDS = "runs/demo/shards"


def real_landmarks(root: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, K, 2) dlib landmarks of the train split (repeated when it has fewer) and the
    split's mean (K, 2)."""
    from datamodules.faces import read_landmarks

    table, mean = read_landmarks(root, "train")
    points = torch.stack([torch.as_tensor(p, dtype=torch.float32) for p in table.values()])
    repeats = math.ceil(count / len(points))
    return points.repeat(repeats, 1, 1)[:count], torch.as_tensor(mean, dtype=torch.float32)


def smooth_images(count: int, size: int) -> torch.Tensor:
    """(count, 3, S, S) seeded low-frequency colour patterns in [0, 1]."""
    coarse = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(coarse, size=size, mode="bicubic").clamp(0, 1)


def seconds(work: Callable[[], object], repeats: int) -> float:
    """Mean wall time of `work` after one untimed call."""
    work()
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - start) / repeats


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def warp_step(texture: torch.Tensor, landmarks: torch.Tensor, mean: torch.Tensor, stride: int):
    """One decoder-step warp: forward and backward to texture and landmarks."""
    texture = texture.detach().requires_grad_()
    points = landmarks.detach().requires_grad_()
    return lambda: warp(texture, points, mean, stride=stride).sum().backward()


def report(root: str, size: int, batch_size: int, repeats: int) -> str:
    landmarks, mean = real_landmarks(root, batch_size)  # (B, K, 2), (K, 2)
    images = smooth_images(batch_size, size)  # (B, 3, S, S)
    times = {
        stride: (seconds(warp_step(images, landmarks, mean, stride), repeats),
                 seconds(lambda s=stride: unwarp(images, landmarks, mean, stride=s), repeats))
        for stride in (1, FLOW_STRIDE)
    }  # fmt: skip
    grids = [tps_flow(mean.expand_as(landmarks), landmarks, size, size, stride=s)
             for s in (1, FLOW_STRIDE)]  # fmt: skip
    pixels = ((grids[1] - grids[0]).norm(dim=-1) * size / 2).flatten()  # deviation, pixels
    quantiles = torch.quantile(pixels[: 2**24], torch.tensor([0.5, 0.99])).tolist()
    warped = [warp(images, landmarks, mean, stride=s) for s in (1, FLOW_STRIDE)]
    unwarped = [unwarp(images, landmarks, mean, stride=s) for s in (1, FLOW_STRIDE)]
    (warp_1, unwarp_1), (warp_n, unwarp_n) = times[1], times[FLOW_STRIDE]
    return "\n".join([
        f"warp benchmark: {batch_size} faces of {size} x {size}, dlib landmarks from {root}, "
        f"{torch.get_num_threads()} threads",
        f"{'stride':>8}{'warp fwd+bwd ms':>18}{'unwarp ms':>12}",
        f"{1:>8}{warp_1 * 1e3:>18.1f}{unwarp_1 * 1e3:>12.1f}",
        f"{FLOW_STRIDE:>8}{warp_n * 1e3:>18.1f}{unwarp_n * 1e3:>12.1f}",
        f"speed-up: warp {warp_1 / warp_n:.1f}x, unwarp {unwarp_1 / unwarp_n:.1f}x",
        f"grid deviation (px): median {quantiles[0]:.3f}, p99 {quantiles[1]:.3f}, "
        f"max {pixels.max():.3f}",
        f"PSNR vs stride 1: warp {psnr(*warped):.1f} dB, unwarp {psnr(*unwarped):.1f} dB",
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s2f bench warp", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=DEFAULT_SHARDS,
                        help="shard root whose train split has landmarks68.npz")  # fmt: skip
    parser.add_argument("--size", type=int, default=64, help="image side (the small preset's 64)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    args = parser.parse_args(argv)
    try:
        print(report(args.shards, args.size, args.batch_size, args.repeats))
    except FileNotFoundError as error:
        parser.error(f"{error}. The decoder's first `s2f fit` writes it (`make demo` builds the "
                     "demo's shards, then `s2f fit --config configs/decoder-demo.yaml`); or "
                     "pass --shards")  # fmt: skip
    return 0
