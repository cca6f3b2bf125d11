"""FLOPs of a model's forward and backward, counted from the layer shapes of one real call.

Forward hooks on every convolution (including the encoder's `SameConv2d`), transposed
convolution and linear layer read the shapes each call really has, so padding, strides and
the input length are whatever the model does, not a formula kept beside it:

- convolution: one multiply-accumulate (MAC) per output element per kernel tap and input
  channel of its group, MACs = numel(output) x C_in / groups x prod(kernel). Counting from the
  output covers `SameConv2d`'s padded input: every output position is a full kernel dot
  product, zeros included, which is what the hardware computes.
- transposed convolution: each input element is scattered through the kernel,
  MACs = numel(input) x C_out / groups x prod(kernel).
- linear: MACs = numel(input) / in_features x in_features x out_features.

FLOPs = 2 x MACs. Bias adds, activations, normalisation, pooling and padding are not counted:
they are elementwise, memory-bound and below 1% of the encoder's FLOPs.

Backward. A layer's backward is two products of the forward's size: the input gradient
(dL/dx, needed when the input requires grad) and the weight gradient (dL/dW, needed when the
weight requires grad). The common rule "training = 3 x forward" assumes both everywhere; the
count here is exact under that model: the first convolution gets no input gradient (the
spectrogram needs none), and frozen layers (the loss's teacher fc8) get no weight gradient.
Run the model on the meta device (`with torch.device("meta"): model = ...`) to count a large
model without computing anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

FLOPS_PER_MAC = 2  # one multiply and one add
TRAINING_RULE = 3  # forward + input gradient + weight gradient, each the forward's cost
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class FlopCount:
    """FLOPs of one call: `total` forward, `by_layer` forward per layer name (a layer called
    twice is summed), `backward` the input- and weight-gradient FLOPs that call implies."""

    total: int = 0
    by_layer: dict[str, int] = field(default_factory=dict)
    backward: int = 0

    @property
    def training(self) -> int:
        """Forward + backward FLOPs: one optimisation step's compute for this input."""
        return self.total + self.backward

    def add(self, name: str, forward: int, input_grad: bool, weight_grad: bool) -> None:
        self.total += forward
        self.by_layer[name] = self.by_layer.get(name, 0) + forward
        self.backward += forward * (int(input_grad) + int(weight_grad))


def layer_macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """MACs of one call of a convolution, transposed convolution or linear layer."""
    if isinstance(module, TRANSPOSED_CONVS):
        return x.numel() * module.out_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, CONVS):
        return y.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return x.numel() * module.out_features
    raise TypeError(f"layer_macs: no FLOP rule for {type(module).__name__}; count "
                    "Conv*, ConvTranspose* or Linear layers")


def _recorder(count: FlopCount, name: str):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        grad_on = torch.is_grad_enabled()  # under no_grad a call has no backward at all
        count.add(name, FLOPS_PER_MAC * layer_macs(module, x, output),
                  input_grad=grad_on and x.requires_grad,
                  weight_grad=grad_on and module.weight.requires_grad)
    return hook


@contextmanager
def flop_counter(model: nn.Module) -> Iterator[FlopCount]:
    """A `FlopCount` that fills up with every counted layer call made inside the block."""
    count = FlopCount()
    handles = [module.register_forward_hook(_recorder(count, name or type(module).__name__))
               for name, module in model.named_modules()
               if isinstance(module, (*CONVS, *TRANSPOSED_CONVS, nn.Linear))]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def count_flops(model: nn.Module, example_input: torch.Tensor) -> FlopCount:
    """FLOPs of `model(example_input)` for the whole batch given; grad is on so that `backward`
    knows which inputs and weights need gradients (use the meta device to skip the compute)."""
    with flop_counter(model) as count, torch.enable_grad():
        model(example_input)
    return count


def rule_of_three(forward: int) -> int:
    """The usual training estimate, 3 x forward; `FlopCount.training` is the exact count."""
    return TRAINING_RULE * forward
