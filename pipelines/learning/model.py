"""The architectures model families are built from (conf/models.yaml, `pipelines.learning.families`).

Every model takes flat float32 rows of n features (batch, n) and reshapes them to its input shape
itself, so training, ONNX export (input `(batch, n)`), serving and drift see one row format for
every family. Image rows are channel-major (C, then H, then W). Each model keeps its
`input_shape` and `n_classes`; nothing is pretrained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class ConvNet(nn.Module):
    """3x3 convolutions with ReLU, one 2x2 max-pool, a hidden dense layer (the digits demo's CNN).

    With channels (16, 32), hidden 64 and input 1x8x8 it is the factory's original DigitsCNN, layer
    for layer, so the digits stages train the same model they always did."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, *, channels: Sequence[int] = (16, 32),
                 hidden: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        c, h, w = (int(d) for d in input_shape)
        if h < 2 or w < 2:
            raise ValueError(f"the cnn architecture needs images of at least 2x2 pixels, not {h}x{w}")
        self.input_shape, self.n_classes = (c, h, w), int(n_classes)
        layers: list[nn.Module] = []
        for width in channels:
            layers += [nn.Conv2d(c, int(width), kernel_size=3, padding=1), nn.ReLU()]
            c = int(width)
        layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * (h // 2) * (w // 2), hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, self.n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.reshape(-1, *self.input_shape)))


class ResidualBlock(nn.Module):
    """The basic residual block (two 3x3 convolutions) with GroupNorm in place of BatchNorm: no
    statistics across the batch, so per-sample gradients (differential privacy) stay possible."""

    def __init__(self, in_width: int, width: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, width)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_width != width:
            self.shortcut = nn.Sequential(nn.Conv2d(in_width, width, kernel_size=1, stride=stride, bias=False),
                                          nn.GroupNorm(groups, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for C x H x W inputs: a 3x3 stem (no downsampling: inputs may be tiny), one
    stage of residual blocks per width, each stage after the first at half the resolution, global
    average pooling and a linear head."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, *, widths: Sequence[int] = (16, 32, 64),
                 blocks: Sequence[int] = (1, 1, 1), groups: int = 4) -> None:
        super().__init__()
        c, h, w = (int(d) for d in input_shape)
        self.input_shape, self.n_classes = (c, h, w), int(n_classes)
        self.stem = nn.Sequential(nn.Conv2d(c, int(widths[0]), kernel_size=3, padding=1, bias=False),
                                  nn.GroupNorm(groups, int(widths[0])), nn.ReLU())
        stages: list[nn.Module] = []
        in_width = int(widths[0])
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for block in range(int(count)):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(ResidualBlock(in_width, int(width), stride, groups))
                in_width = int(width)
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_width, self.n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x.reshape(-1, *self.input_shape))))


class MLP(nn.Module):
    """Dense layers over rows of n features, standardised first with the training rows' mean and
    spread (buffers: saved with the weights, exported into the ONNX graph)."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, *, hidden: Sequence[int] = (64, 64),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.input_shape, self.n_classes = tuple(int(d) for d in input_shape), int(n_classes)
        n_features = math.prod(self.input_shape)
        self.register_buffer("input_mean", torch.zeros(n_features))
        self.register_buffer("input_scale", torch.ones(n_features))
        layers: list[nn.Module] = []
        width = n_features
        for out in hidden:
            layers += [nn.Linear(width, int(out)), nn.ReLU(), nn.Dropout(dropout)]
            width = int(out)
        layers.append(nn.Linear(width, self.n_classes))
        self.net = nn.Sequential(*layers)

    def fit_inputs(self, x: torch.Tensor) -> None:
        """Set the standardisation from the training rows (a new model only: fine-tuning keeps the base's)."""
        std = x.std(dim=0, unbiased=False)
        self.input_mean.copy_(x.mean(dim=0))
        self.input_scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.input_mean.shape[0])
        return self.net((x - self.input_mean) / self.input_scale)
