"""The models of the task registry: small enough that a sweep over 64 simulated workers runs
on a laptop CPU (or, in the larger sizes, in seconds per step on one GPU), and free of batch
statistics, so that per-worker gradients can be taken with ``torch.func.vmap`` and equal what a
real worker computes.

Batch statistics are the reason the convolutional classifier normalises with GroupNorm, not
BatchNorm: BatchNorm's running mean and variance are buffers that every forward pass in
training mode updates in place. Under ``vmap`` over workers that update writes a per-worker
value into one shared buffer, which functorch refuses; and in real data-parallel training each
worker's running statistics drift apart unless they are synchronised too, a second reduction
that is not the one under study. GroupNorm normalises each example by itself, so a worker's
gradient depends on its own examples only and there is nothing to keep in step.

The transformer's attention is written out (scores, causal mask, softmax) rather than calling
``F.scaled_dot_product_attention``: the fused kernels have no batching rule for ``vmap`` and
would run worker after worker.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MODELS", "build_model", "ByteTransformer", "ResidualCNN"]

MODELS = ("mlp", "cnn", "linear")


def build_model(name: str, inputs: int, outputs: int) -> nn.Module:
    """A fresh model (initialised from torch's global generator)."""
    if name == "linear":
        return nn.Linear(inputs, outputs)
    if name == "mlp":
        return nn.Sequential(nn.Linear(inputs, 64), nn.ReLU(), nn.Linear(64, outputs))
    if name == "cnn":
        side = int(round(inputs**0.5))
        if side * side != inputs:
            raise ValueError(f"the cnn needs square images, got {inputs} features")
        return nn.Sequential(
            nn.Unflatten(1, (1, side, side)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * (side // 2) ** 2, outputs),
        )
    raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")


# ------------------------------------------------------------------------------ transformer

class _CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"the width {width} must be a multiple of the heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        # [3, batch, heads, time, width / heads]
        q, k, v = self.qkv(x).view(batch, time, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(width // self.heads)
        future = torch.ones(time, time, dtype=torch.bool, device=x.device).triu(1)
        attended = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        return self.out(attended.transpose(1, 2).reshape(batch, time, width))


class _Block(nn.Module):
    """Pre-norm: the residual stream itself is never normalised, which keeps a small model
    trainable without warm-up."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = _CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ByteTransformer(nn.Module):
    """A decoder-only language model over bytes: ``[batch, time]`` integers in 0..255 to
    ``[batch, time, 256]`` logits of the next byte, with learned positions up to ``context``."""

    def __init__(self, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(256, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        where = torch.arange(x.shape[-1], device=x.device)
        return self.head(self.norm(self.blocks(self.tokens(x) + self.positions(where))))


# ------------------------------------------------------------------------------ residual CNN

def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # No bias: the GroupNorm after it has its own shift.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.GroupNorm(4, cout))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class ResidualCNN(nn.Module):
    """A small ResNet for ``[batch, 1, side, side]`` images: three stages of ``width``,
    ``2 width`` and ``4 width`` channels (the last two halve the resolution), each a
    convolution and a residual block, GroupNorm throughout, global average pooling."""

    def __init__(self, classes: int, width: int = 16) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        cin = 1
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            stages += [_conv(cin, cout, 1 if i == 0 else 2), nn.ReLU(), _Residual(cout)]
            cin = cout
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
