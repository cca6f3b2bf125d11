"""`s2f bench`: training throughput, FLOP utilisation, the learning-rate rule and a scaling model.

    s2f bench train [--preset paper] [--batch-size 8] [--precision bf16-mixed|32] [--compile]
                    [--channels-last] [--fused-adam] [--steps 20] [--warmup 5]
                    [--mode synthetic|shards] [--shards DIR] [--device cuda|cpu]
                    [--sweep-batch 8,16,32] [--json OUT]
    s2f bench scaling [--step-time S | --from-json OUT] [--batch-size 8] [--mfu 0.4] ...
    s2f bench data ...      (datamodules.bench: bytes per sample and loader throughput)
    s2f bench warp ...      (s2f.warp_bench: the decoder's warp, every pixel vs the lattice)

`train` runs a plain loop over the real `Speech2Face` module: its loss, and the optimiser and
step schedule of its `configure_optimizers`. Synthetic mode draws on-device random batches
(B, 2, 598, 257) + (B, D) fc7, so it measures the model alone; shards mode reads real batches
through `ShardDataModule` (the audio payload's spectrogram is made on the device). After the
warm-up steps (cuDNN autotuning, compilation), every timed step is split into data wait,
forward (encoder + loss), backward and optimiser, timed with CUDA events on a GPU (read after
one final synchronize, so the loop is never stalled) and with perf_counter on the CPU.
Achieved FLOP/s use the exact training FLOP count of `s2f.flops` (encoder and loss), MFU the
device's dense peak from `PEAK_TFLOPS`.

`scaling` predicts data-parallel step time and efficiency from a single-GPU step time and the
gradient all-reduce (docs/scaling.md explains the model and its figures).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from s2f.audio import N_BINS, SAMPLE_RATE, SECONDS, num_frames
from s2f.flops import FlopCount, count_flops, flop_counter, rule_of_three
from s2f.module import PAPER_BATCH, Speech2Face, scaled_lr_schedule

FRAMES = num_frames(int(SAMPLE_RATE * SECONDS))  # 598 frames of a 6-s clip
PHASES = ("data", "forward", "backward", "optimiser")
KIB = 1024  # bytes; Linux reports ru_maxrss in KiB
GIB = 1024**3  # bytes
MIB = 1024**2  # bytes
TERA = 1e12
GBPS = 1e9  # bytes/s per GB/s

# Dense (no structured sparsity) tensor-core peaks, TFLOP/s, from NVIDIA's datasheets; where a
# datasheet quotes only the sparse figure it is halved. First matching pattern wins, so the
# specific names (H100 PCIe, H100 NVL) come before the plain one. "tf32" is what precision 32
# runs here: cuDNN convolutions default to TF32 and the benchmark sets matmuls to TF32 too.
H100_SXM = {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # H100 datasheet: PCIe 1,513 / 756 sparse (BF16 / TF32), FP32 51.
    (r"\bH100 PCIe\b", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    # H100 datasheet: NVL 1,671 / 835 sparse, FP32 60.
    (r"\bH100 NVL\b", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    # H200 datasheet: H200 NVL 1,671 / 835 sparse, FP32 60.
    (r"\bH200 NVL\b", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    # H100 SXM 1,979 / 989 sparse, FP32 67; H200 SXM and GH200 quote the same compute.
    (r"\b(H100|H200|GH200)\b", H100_SXM),
    # A100 datasheet (SXM and PCIe): BF16 312, TF32 156, FP32 19.5 dense.
    (r"\bA100\b", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    # L40S datasheet: BF16 362.05, TF32 183, FP32 91.6 dense.
    (r"\bL40S\b", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    # L40 datasheet: BF16 181.05, TF32 90.5, FP32 90.5 dense.
    (r"\bL40\b", {"bf16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    # L4 datasheet: 242 / 120 sparse, FP32 30.3.
    (r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    # A10 datasheet: BF16 125, TF32 62.5, FP32 31.2 dense.
    (r"\bA10\b", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
)
PRECISIONS = {"bf16-mixed": "bf16", "32": "tf32"}  # --precision -> PEAK_TFLOPS key on CUDA

# Scaling model (docs/scaling.md). Bus bandwidths are NCCL's busbw (nccl-tests
# doc/PERFORMANCE.md: all-reduce time = 2 (n - 1) / n x bytes / busbw).
NVLINK_BUSBW = 450 * GBPS  # H100 SXM NVLink 4: 450 GB/s per direction; nccl-tests reach 460-480
NIC_BUSBW = {"200G": 25 * GBPS, "400G": 50 * GBPS}  # per node: line rate, an upper bound
NVLINK_LATENCY = 20e-6  # s per all-reduce call inside a node (assumed, small-message time)
NET_LATENCY = 50e-6  # s per all-reduce call across nodes (assumed)
GPUS_PER_NODE = 8
DDP_BUCKET_MIB = 25  # torch DDP's default bucket_cap_mb
ASSUMED_MFU = 0.40  # until measured: conv nets under cuDNN bf16 typically reach 30-50%
EFFICIENCY_GOAL = 0.90


# --- learning-rate rule --------------------------------------------------------------------------


# --- FLOPs and peaks -----------------------------------------------------------------------------


def step_flops(preset: str, feature_dim: int, num_classes: int, frames: int, bins: int) -> FlopCount:
    """FLOPs of one training sample of `Speech2Face` (encoder + loss), counted on the meta device."""
    with torch.device("meta"):
        module = Speech2Face(encoder=preset, feature_dim=feature_dim, num_classes=num_classes)
        spec, fc7 = torch.empty(1, 2, frames, bins), torch.empty(1, feature_dim)  # (1, 2, T, Q), (1, D)
    with flop_counter(module) as count, torch.enable_grad():
        module.loss(module(spec), fc7)
    return count


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a CUDA device by name for the precision; None when not tabled."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks[PRECISIONS[precision]]
    return None


# --- batches -------------------------------------------------------------------------------------


def synthetic_batches(batch_size: int, feature_dim: int, device: torch.device,
                      frames: int = FRAMES) -> Iterator[dict]:
    """Endless on-device random batches: (B, 2, T, 257) spectrograms and (B, D) features."""
    while True:
        yield {"spec": torch.randn(batch_size, 2, frames, N_BINS, device=device),
               "fc7": torch.randn(batch_size, feature_dim, device=device).relu()}


def shard_batches(root: str, batch_size: int, workers: int, device: torch.device) -> Iterator[dict]:
    """Endless train batches from `ShardDataModule`, moved to `device` with the spectrogram made there."""
    from datamodules.shards import ShardDataModule

    data = ShardDataModule(root, batch_size=batch_size, num_workers=workers)
    loader = data.train_dataloader()
    while True:  # each new iter() over a finished epoch starts the next one
        for batch in loader:
            moved = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            yield data.on_after_batch_transfer(moved, 0)


# --- timing --------------------------------------------------------------------------------------


class PhaseClock:
    """Phase boundaries: CUDA events on a GPU (read once at the end), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (synchronizes on a GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the training benchmark ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrainBench:
    """Settings of one `s2f bench train` run."""

    preset: str = "paper"
    batch_size: int = PAPER_BATCH
    precision: str = "bf16-mixed"
    compile: bool = False
    channels_last: bool = False
    fused_adam: bool = False
    steps: int = 20
    warmup: int = 5
    mode: str = "synthetic"
    shards: str | None = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    feature_dim: int = 4096  # synthetic mode; shards mode takes the shards' D
    frames: int = FRAMES  # synthetic mode: T of the spectrogram (6 s); shorter for quick checks
    num_classes: int = 2622
    workers: int = 2

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.mode not in ("synthetic", "shards"):
            raise ValueError(f"--mode must be synthetic or shards, got {self.mode!r}")
        if self.mode == "shards" and not self.shards:
            raise ValueError("--mode shards needs --shards DIR (a folder with train/val/test shards)")
        if self.steps < 1 or self.warmup < 0 or self.batch_size < 1:
            raise ValueError(f"need --steps >= 1, --warmup >= 0, --batch-size >= 1; got "
                             f"{self.steps}, {self.warmup}, {self.batch_size}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here; use --device cpu")


@dataclass(frozen=True)
class TrainResult:
    """Figures of one run; times are means per timed step, in seconds."""

    settings: dict
    device_name: str
    optimizer: str
    step_s: float
    phase_s: dict[str, float]
    samples_per_s: float
    forward_flops_per_sample: int
    train_flops_per_sample: int
    achieved_tflops: float
    peak_tflops: float | None
    mfu: float | None
    peak_memory_bytes: int
    peak_memory_kind: str
    scaled_lr: float
    scaled_decay_steps: int


def use_fused(optimizer: torch.optim.Optimizer) -> None:
    """Switch an Adam/AdamW to its fused kernel before its first step, hyperparameters unchanged.

    torch reads `fused` and `foreach` from each param group at step time, so this equals
    constructing it with fused=True; the module asks for it itself only on CUDA.
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"--fused-adam: the module's optimiser is {type(optimizer).__name__}, not Adam")
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    group = optimizer.param_groups[0]
    return f"{type(optimizer).__name__} ({'fused' if group.get('fused') else 'not fused'})"


def prepare(config: TrainBench, feature_dim: int, device: torch.device):
    """The module on `device`, its optimiser and schedule (built after the move, as Lightning does)."""
    module = Speech2Face(encoder=config.preset, feature_dim=feature_dim, num_classes=config.num_classes)
    module = module.to(device).train()
    if config.channels_last:
        module = module.to(memory_format=torch.channels_last)
    setup = module.configure_optimizers()
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    if config.fused_adam:
        use_fused(optimizer)
    return module, optimizer, schedule


def loss_function(module: Speech2Face, compile_model: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(spec, fc7) -> total loss, the computation of `Speech2Face.training_step` without logging."""
    def total(spec: torch.Tensor, fc7: torch.Tensor) -> torch.Tensor:
        return module.loss(module(spec), fc7)["total"]
    return torch.compile(total, dynamic=False) if compile_model else total


@dataclass(frozen=True)
class Timing:
    seconds: list[float]  # phase durations of the timed steps, PHASES order, step after step
    wall_s: float  # wall time of the timed steps, synchronized at both ends
    optimizer: str
    spec_shape: tuple[int, ...]  # (B, 2, T, Q) of the batches
    feature_dim: int  # D of the batches' fc7


def train_step(batches: Iterator[dict], total: Callable, optimizer: torch.optim.Optimizer, schedule,
               autocast: contextlib.AbstractContextManager, layout: torch.memory_format,
               mark: Callable[[], None]) -> None:
    """One step, marking the end of each phase: data wait, forward + loss, backward, optimiser."""
    batch = next(batches)
    spec = batch["spec"].contiguous(memory_format=layout)  # (B, 2, T, Q)
    mark()
    with autocast:
        loss = total(spec, batch["fc7"])
    mark()
    loss.backward()
    mark()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    mark()


def timed_steps(config: TrainBench, batches: Iterator[dict], device: torch.device) -> Timing:
    """Warm-up steps, then timed steps of the module built for the batches' feature dimension."""
    first = next(batches)
    batches = _chain(first, batches)
    module, optimizer, schedule = prepare(config, first["fc7"].shape[1], device)
    total = loss_function(module, config.compile)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16-mixed")
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    for _ in range(config.warmup):
        train_step(batches, total, optimizer, schedule, autocast, layout, _nothing)
    clock = PhaseClock(device)
    synchronize(device)  # warm-up work (autotuning, compilation) must not leak into the timing
    start = time.perf_counter()
    clock.mark()
    for _ in range(config.steps):
        train_step(batches, total, optimizer, schedule, autocast, layout, clock.mark)
    synchronize(device)
    wall = time.perf_counter() - start
    return Timing(clock.seconds(), wall, optimizer_name(optimizer), tuple(first["spec"].shape), first["fc7"].shape[1])


def _nothing() -> None:
    pass


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def phase_means(seconds: list[float], steps: int) -> dict[str, float]:
    """Mean seconds per phase from the flat list of per-step phase durations."""
    per_phase = [seconds[i::len(PHASES)] for i in range(len(PHASES))]
    return {name: sum(values) / steps for name, values in zip(PHASES, per_phase)}


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB, "ru_maxrss (whole process)"


def bench_train(config: TrainBench) -> TrainResult:
    """One training benchmark run (see the module docstring)."""
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the input shape is fixed: autotune once, in warm-up
        torch.set_float32_matmul_precision("high")  # precision 32 runs TF32, as its peak assumes
        torch.cuda.reset_peak_memory_stats(device)
    batches = (synthetic_batches(config.batch_size, config.feature_dim, device, config.frames) if config.mode == "synthetic"
               else shard_batches(config.shards, config.batch_size, config.workers, device))
    timing = timed_steps(config, batches, device)
    phases = phase_means(timing.seconds, config.steps)
    flops = step_flops(config.preset, timing.feature_dim, config.num_classes, *timing.spec_shape[2:])
    samples_per_s = config.batch_size * config.steps / timing.wall_s
    achieved = flops.training * samples_per_s / TERA
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, config.precision) if device.type == "cuda" else None
    memory, memory_kind = peak_memory(device)
    lr, decay = scaled_lr_schedule(config.batch_size)
    return TrainResult(
        settings=asdict(config), device_name=name, optimizer=timing.optimizer, step_s=timing.wall_s / config.steps,
        phase_s=phases, samples_per_s=samples_per_s, forward_flops_per_sample=flops.total,
        train_flops_per_sample=flops.training, achieved_tflops=achieved, peak_tflops=peak,
        mfu=None if peak is None else achieved / peak, peak_memory_bytes=memory,
        peak_memory_kind=memory_kind, scaled_lr=lr, scaled_decay_steps=decay)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def sweep_batch(config: TrainBench, sizes: Sequence[int]) -> tuple[list[TrainResult | str], int | None]:
    """Run each batch size; (results, "OOM at N" where N did not fit; the fastest size or None)."""
    results: list[TrainResult | str] = []
    for size in sizes:
        try:
            results.append(bench_train(replace(config, batch_size=size)))
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            results.append(f"OOM at {size}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    fitted = [(r.samples_per_s, s) for r, s in zip(results, sizes) if isinstance(r, TrainResult)]
    return results, max(fitted)[1] if fitted else None


# --- report --------------------------------------------------------------------------------------


TABLE_ROWS = ("device", "preset", "batch size", "precision", "options", "optimiser", "step ms (wall)",
              *(f"  {name} ms" for name in PHASES), "samples/s", "achieved TFLOP/s", "MFU (peak TFLOP/s)",
              "peak memory GiB")


def _column(result: TrainResult | str) -> list[str]:
    if isinstance(result, str):
        return [result] * len(TABLE_ROWS)
    s, ms = result.settings, {k: f"{v * 1e3:.2f}" for k, v in result.phase_s.items()}
    return [result.device_name, s["preset"], str(s["batch_size"]), s["precision"],
            f"{'compile ' if s['compile'] else ''}{'channels-last' if s['channels_last'] else ''}".strip() or "-",
            result.optimizer, f"{result.step_s * 1e3:.2f}",
            *(ms[name] for name in PHASES), f"{result.samples_per_s:,.1f}",
            f"{result.achieved_tflops:.3f}",
            "n/a" if result.mfu is None else f"{result.mfu:.1%} of {result.peak_tflops:g}",
            f"{result.peak_memory_bytes / GIB:.2f} ({result.peak_memory_kind.split()[0]})"]


def format_table(results: Sequence[TrainResult | str]) -> str:
    """A column per run: settings, step-time split (ms), samples/s, TFLOP/s, MFU, memory."""
    columns = [_column(r) for r in results]
    width = max(len(cell) for column in columns for cell in column) + 2
    lines = [f"{row:22s}" + "".join(f"{c[i]:>{width}}" for c in columns) for i, row in enumerate(TABLE_ROWS)]
    fitted = next((r for r in results if isinstance(r, TrainResult)), None)
    if fitted is not None:
        lines.append(f"training FLOPs per sample: {fitted.train_flops_per_sample / 1e9:,.2f} G "
                     f"(exact; 3 x forward = {rule_of_three(fitted.forward_flops_per_sample) / 1e9:,.2f} G)")
    return "\n".join(lines)


# --- scaling model -------------------------------------------------------------------------------


def allreduce_seconds(nbytes: float, gpus: int, busbw: float, latency_s: float) -> float:
    """Ring all-reduce time: latency + 2 (n - 1) / n x bytes / busbw (0 on one GPU)."""
    if gpus <= 1:
        return 0.0
    return latency_s + 2 * (gpus - 1) / gpus * nbytes / busbw


def gradient_buckets(profile: Sequence[tuple[int, float]], bytes_per_grad: float,
                     bucket_bytes: float) -> list[tuple[float, float]]:
    """(bytes, fraction of backward done when ready) per DDP bucket.

    `profile`: (parameters, backward share) per tensor in the order gradients become ready
    (last layer first). Like DDP, a bucket closes once it reaches `bucket_bytes`, so a tensor
    larger than the cap is a bucket of its own.
    """
    total_share = sum(share for _, share in profile) or 1.0
    buckets, size, done = [], 0.0, 0.0
    for params, share in profile:
        done += share / total_share
        size += params * bytes_per_grad
        if size >= bucket_bytes:
            buckets.append((size, done))
            size = 0.0
    if size:
        buckets.append((size, done))
    return buckets


def exposed_comm_seconds(buckets: Sequence[tuple[float, float]], backward_s: float, gpus: int,
                         busbw: float, latency_s: float, overlap: bool) -> float:
    """Seconds the all-reduces run past the end of backward; one bucket on the wire at a time."""
    free = 0.0  # when the communication stream is next idle, from the start of backward
    for nbytes, ready in buckets:
        start = max(free, ready * backward_s if overlap else backward_s)
        free = start + allreduce_seconds(nbytes, gpus, busbw, latency_s)
    return max(0.0, free - backward_s)


@dataclass(frozen=True)
class ScalingPoint:
    gpus: int
    accumulation: int
    overlap: bool
    comm_s: float  # all-reduce time of one optimiser step's gradients
    exposed_s: float  # of it, not hidden behind backward
    step_s: float  # one optimiser step: `accumulation` micro-batches + exposed communication
    efficiency: float  # per-GPU throughput relative to one GPU

    @property
    def speedup(self) -> float:
        return self.gpus * self.efficiency


def predict_scaling(step_time_s: float, params: int, gpus: int, busbw: float, latency_s: float = NVLINK_LATENCY,
                    bytes_per_grad: float = 2, bucket_bytes: float = DDP_BUCKET_MIB * MIB, overlap: bool = True,
                    accumulation: int = 1, backward_fraction: float = 2 / 3,
                    profile: Sequence[tuple[int, float]] | None = None) -> ScalingPoint:
    """Data-parallel step time and efficiency from a measured single-GPU step.

    Gradients are all-reduced once per optimiser step, after the last of `accumulation`
    micro-batches (DDP's no_sync on the others), overlapping that micro-batch's backward
    (`backward_fraction` of a step) when `overlap`. `profile` (see `gradient_buckets`) says when
    gradients become ready; None: all at the end of backward, the case that overlap cannot help.
    """
    if step_time_s <= 0 or params < 1 or gpus < 1 or accumulation < 1 or not 0 <= backward_fraction <= 1:
        raise ValueError(f"predict_scaling: need step_time_s > 0, params >= 1, gpus >= 1, accumulation >= 1 "
                         f"and 0 <= backward_fraction <= 1; got {step_time_s}, {params}, {gpus}, "
                         f"{accumulation}, {backward_fraction}")
    buckets = gradient_buckets(profile or [(params, 1.0)], bytes_per_grad, bucket_bytes)
    comm = sum(allreduce_seconds(b, gpus, busbw, latency_s) for b, _ in buckets)
    exposed = exposed_comm_seconds(buckets, backward_fraction * step_time_s, gpus, busbw, latency_s, overlap)
    compute = accumulation * step_time_s
    return ScalingPoint(gpus, accumulation, overlap, comm, exposed, compute + exposed, compute / (compute + exposed))


def gradient_profile(model: nn.Module, count: FlopCount) -> list[tuple[int, float]]:
    """(parameters, backward share) per trainable tensor, last registered first (DDP's order).

    A layer's share is its forward FLOPs (backward is ~2x forward per layer), given to the first
    of its tensors met; parameters of uncounted layers (batch norm) share their neighbours' time.
    """
    profile, seen = [], set()
    for name, param in reversed(list(model.named_parameters())):
        if not param.requires_grad:
            continue
        layer = name.rpartition(".")[0]
        profile.append((param.numel(), 0.0 if layer in seen else float(count.by_layer.get(layer, 0))))
        seen.add(layer)
    return profile


def encoder_profile(preset: str, frames: int = FRAMES, bins: int = N_BINS) -> tuple[int, list[tuple[int, float]], FlopCount]:
    """(parameters, gradient profile, per-sample training FLOPs) of a preset's encoder."""
    with torch.device("meta"):
        encoder = Speech2Face(encoder=preset).encoder
        spec = torch.empty(1, 2, frames, bins)  # (1, 2, T, Q)
    count = count_flops(encoder, spec)
    return sum(p.numel() for p in encoder.parameters()), gradient_profile(encoder, count), count


def scaling_scenarios(nodes: Sequence[int]) -> list[tuple[str, int, float, float]]:
    """(name, GPUs, busbw, latency): one NVLink node, then `nodes` nodes per network speed."""
    scenarios = [("1 node NVLink", GPUS_PER_NODE, NVLINK_BUSBW, NVLINK_LATENCY)]
    for link, busbw in NIC_BUSBW.items():
        scenarios += [(f"{n} nodes {link}", n * GPUS_PER_NODE, min(busbw, NVLINK_BUSBW), NET_LATENCY) for n in nodes]
    return scenarios


def scaling_table(step_time_s: float, preset: str, backward_fraction: float, bytes_per_grad: float,
                  bucket_mib: float, accumulations: Sequence[int], nodes: Sequence[int]) -> str:
    params, profile, _ = encoder_profile(preset)
    lines = [f"step {step_time_s * 1e3:.2f} ms on 1 GPU, backward {backward_fraction:.0%} of it; {params:,} "
             f"parameters x {bytes_per_grad:g} B = {params * bytes_per_grad / 1e6:,.1f} MB per all-reduce; "
             f"buckets {bucket_mib:g} MiB",
             f"{'scenario':18s}{'GPUs':>6s}{'accum':>7s}{'overlap':>9s}{'comm ms':>10s}{'exposed ms':>12s}"
             f"{'step ms':>10s}{'efficiency':>12s}{'speedup':>9s}"]
    for name, gpus, busbw, latency in scaling_scenarios(nodes):
        for accumulation in accumulations:
            for overlap in (False, True):
                p = predict_scaling(step_time_s, params, gpus, busbw, latency, bytes_per_grad, bucket_mib * MIB,
                                    overlap, accumulation, backward_fraction, profile)
                mark = " *" if p.efficiency >= EFFICIENCY_GOAL else ""
                lines.append(f"{name:18s}{gpus:6d}{accumulation:7d}{'yes' if overlap else 'no':>9s}"
                             f"{p.comm_s * 1e3:10.2f}{p.exposed_s * 1e3:12.2f}{p.step_s * 1e3:10.2f}"
                             f"{p.efficiency:12.1%}{p.speedup:9.1f}{mark}")
    lines.append(f"* efficiency >= {EFFICIENCY_GOAL:.0%}")
    return "\n".join(lines)


def predicted_step_time(preset: str, batch_size: int, peak: float, mfu: float) -> float:
    """Single-GPU seconds per step from the exact FLOP count at an assumed MFU (until measured)."""
    _, _, count = encoder_profile(preset)
    return batch_size * count.training / (mfu * peak * TERA)


# --- command line --------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,16,32, got {text!r}") from None


def train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training throughput, step-time split, MFU, peak memory")
    d = TrainBench()
    p.add_argument("--preset", default=d.preset, choices=("paper", "small", "tiny"))
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--precision", default=d.precision, choices=sorted(PRECISIONS))
    p.add_argument("--compile", action="store_true", help="torch.compile the forward and loss")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels-last layout")
    p.add_argument("--fused-adam", action="store_true", help="switch the module's Adam to its fused kernel")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first")
    p.add_argument("--mode", default=d.mode, choices=("synthetic", "shards"))
    p.add_argument("--shards", default=None, help="shard root (train/val/test) for --mode shards")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers in shards mode")
    p.add_argument("--device", default=d.device, choices=("cuda", "cpu"))
    p.add_argument("--feature-dim", type=int, default=d.feature_dim, help="D of synthetic fc7")
    p.add_argument("--frames", type=int, default=d.frames, help="T of synthetic spectrograms (598: 6 s)")
    p.add_argument("--sweep-batch", type=int_list, default=None, help="e.g. 8,16,32: the fastest that fits")
    p.add_argument("--json", default=None, help="also write the figures to this file")


def scaling_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scaling", help="predicted data-parallel efficiency (docs/scaling.md)")
    p.add_argument("--step-time", type=float, default=None,
                   help="measured single-GPU seconds per step; default: predicted from FLOPs at --mfu")
    p.add_argument("--from-json", default=None, help="take step time and backward share from a bench train --json")
    p.add_argument("--preset", default="paper", choices=("paper", "small", "tiny"))
    p.add_argument("--batch-size", type=int, default=PAPER_BATCH, help="per-GPU batch of the predicted step")
    p.add_argument("--mfu", type=float, default=ASSUMED_MFU)
    p.add_argument("--peak-tflops", type=float, default=H100_SXM["bf16"], help="default H100 SXM bf16")
    p.add_argument("--backward-fraction", type=float, default=None, help="backward share of a step")
    p.add_argument("--grad-bytes", type=float, default=2, help="bytes per communicated gradient (bf16 2, fp32 4)")
    p.add_argument("--bucket-mb", type=float, default=DDP_BUCKET_MIB, help="DDP bucket_cap_mb")
    p.add_argument("--accumulation", type=int_list, default=[1, 2, 4])
    p.add_argument("--nodes", type=int_list, default=[2, 16])


def run_train(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in TrainBench.__dataclass_fields__}
    config = TrainBench(**fields)
    sizes = args.sweep_batch or [config.batch_size]
    results, best = sweep_batch(config, sizes)
    print(format_table(results))
    if args.sweep_batch:
        print(f"fastest batch size that fits: {best}" if best else "no batch size fitted in memory")
    if args.json:
        payload = [r if isinstance(r, str) else asdict(r) for r in results]
        Path(args.json).write_text(json.dumps({"runs": payload, "best_batch_size": best}, indent=2))
    return 0 if best else 1


def run_scaling(args: argparse.Namespace) -> int:
    step, backward, preset = args.step_time, args.backward_fraction, args.preset
    if args.from_json:  # the measured run decides the model too
        run = json.loads(Path(args.from_json).read_text())["runs"][0]
        step = step or run["step_s"]
        backward = backward or run["phase_s"]["backward"] / run["step_s"]
        preset = run["settings"]["preset"]
    _, _, count = encoder_profile(preset)
    backward = backward if backward is not None else count.backward / count.training
    if step is None:
        step = predicted_step_time(preset, args.batch_size, args.peak_tflops, args.mfu)
        print(f"PREDICTED step time (not measured): batch {args.batch_size} x {count.training / 1e9:,.2f} GFLOP "
              f"at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s")
    print(scaling_table(step, preset, backward, args.grad_bytes, args.bucket_mb, args.accumulation, args.nodes))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`s2f bench train|scaling|data|shards|warp ARGS`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Benchmarks of other stages live beside them.
    delegated = {"data": "datamodules.bench", "shards": "shards.bench", "warp": "s2f.warp_bench"}
    if argv[:1] and argv[0] in delegated:
        import importlib

        return importlib.import_module(delegated[argv[0]]).main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="s2f bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser(sub)
    scaling_parser(sub)
    sub.add_parser("data", help="data loading benchmark (s2f bench data --help)")
    sub.add_parser("shards", help="shard building benchmark (s2f bench shards --help)")
    sub.add_parser("warp", help="decoder warp benchmark (s2f bench warp --help)")
    args = parser.parse_args(argv)
    return run_train(args) if args.command == "train" else run_scaling(args)
