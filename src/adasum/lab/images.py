"""The image task: a residual CNN with GroupNorm (:class:`adasum.lab.models.ResidualCNN`) on
scikit-learn's digits under random affine transformations, the analogue of the paper's ResNet-50
on a data set every machine has.

The 1,438 training digits (the split of the ``digits-*`` tasks) become ``samples`` training
examples (default 65,536, about 46 transformed copies of each digit): example i is digit
``i mod 1438`` rotated, scaled, sheared and shifted by the i-th of a fixed list of random affine
maps, and resampled to 16x16 (``F.affine_grid`` / ``F.grid_sample``, bilinear). The maps are
drawn once from the data seed, so example i is the same image in every run (and for every
``samples`` that includes it), in the simulator and
in every worker of ``adasum train``, and the run's seed only varies the model and the data
order; images are made when a step asks for them, so memory holds the maps (24 bytes per
example), not the images. The test set is the held-out digits, each under 4 maps of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from adasum.lab.arrays import digits_task
from adasum.lab.models import ResidualCNN
from adasum.lab.task import DATA_SEED, Task

__all__ = ["IMAGE_TASKS", "AugmentedImages", "augmented_digits", "random_affine", "warp"]

#: The image tasks.
IMAGE_TASKS = ("augdigits-resnet",)
SIDE = 16
DEFAULT_SAMPLES = 65536
_TEST_COPIES = 4
_EVAL_BATCH = 512
#: Ranges of the random maps: rotation and shear in degrees, scale factor, shift as a fraction
#: of the image's half-width (grid_sample's coordinates run from -1 to 1).
_ROTATION, _SHEAR, _SCALE, _SHIFT = 15.0, 10.0, (0.9, 1.1), 0.12


@dataclass(frozen=True, eq=False)
class AugmentedImages(Task):
    """``digits`` ``[n, 1, 8, 8]`` and their ``labels``; ``maps`` ``[train_size, 2, 3]``."""

    name: str
    digits: torch.Tensor
    labels: torch.Tensor
    maps: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    kind: str = "classification"

    @property
    def train_size(self) -> int:
        return len(self.maps)

    def examples(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = index.reshape(-1).to(self.maps.device)
        digit = flat % len(self.digits)
        images = warp(self.digits[digit], self.maps[flat])
        return images.view(*index.shape, 1, SIDE, SIDE), self.labels[digit].view(index.shape)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from zip(self.x_test.split(_EVAL_BATCH), self.y_test.split(_EVAL_BATCH))

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return ResidualCNN(classes=10)

    def to(self, device: torch.device) -> AugmentedImages:
        if self.maps.device == device:
            return self
        return replace(self, **{k: getattr(self, k).to(device)
                                for k in ("digits", "labels", "maps", "x_test", "y_test")})


def random_affine(count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 2, 3]`` maps (``affine_grid``'s theta): rotation, shear, scale and shift drawn
    uniformly from the module's ranges. Map i is made of draws 5i to 5i + 4 of the generator,
    so the first maps are the same whatever ``count`` is."""
    low = torch.tensor([-_ROTATION, -_SHEAR, _SCALE[0], -_SHIFT, -_SHIFT], dtype=torch.float64)
    high = torch.tensor([_ROTATION, _SHEAR, _SCALE[1], _SHIFT, _SHIFT], dtype=torch.float64)
    draws = low + (high - low) * torch.rand(count, 5, generator=generator, dtype=torch.float64)
    angle, shear = draws[:, 0].deg2rad(), draws[:, 1].deg2rad()
    cos, sin = angle.cos() / draws[:, 2], angle.sin() / draws[:, 2]
    # Rotation times a horizontal shear, divided by the scale: theta maps output coordinates to
    # input ones, so a scale above 1 magnifies.
    theta = torch.stack([
        torch.stack([cos, cos * shear.tan() - sin, draws[:, 3]], -1),
        torch.stack([sin, sin * shear.tan() + cos, draws[:, 4]], -1),
    ], 1)
    return theta.float()


def warp(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``[m, 1, h, w]`` images resampled under ``[m, 2, 3]`` maps to ``[m, 1, SIDE, SIDE]``."""
    grid = F.affine_grid(maps, [len(maps), 1, SIDE, SIDE], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augmented_digits(name: str, samples: int | None = None) -> AugmentedImages:
    """The task: ``samples`` augmented training examples (default :data:`DEFAULT_SAMPLES`)."""
    digits = digits_task("digits-cnn")
    train = digits.x_train.view(-1, 1, 8, 8)
    test = digits.x_test.view(-1, 1, 8, 8).repeat(_TEST_COPIES, 1, 1, 1)
    # Separate streams for the training and the test maps: the test set stays the same
    # whatever ``samples`` is.
    maps = random_affine(samples or DEFAULT_SAMPLES, torch.Generator().manual_seed(DATA_SEED))
    test_maps = random_affine(len(test), torch.Generator().manual_seed(DATA_SEED + 1))
    return AugmentedImages(name, train, digits.y_train, maps, warp(test, test_maps),
                           digits.y_test.repeat(_TEST_COPIES))
