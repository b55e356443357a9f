"""CIFAR-style residual networks (3x3 stem, no max-pool) for 32x32 inputs.

* ``resnet20``: 3 stages x 3 basic blocks, widths 16/32/64 (x ``width``): trains in minutes on CPU.
* ``resnet18``: 4 stages x 2 basic blocks, widths 64..512 (x ``width``); ``width=2`` is the paper's
  LRR architecture (WideResNet-18-2).
* ``preact-wrn18``: pre-activation ResNet-18, ``width=2`` by default, ``affine_bn=False`` gives the
  non-affine BatchNorm of the binary (biprop) CARDs.

The post-activation nets take explicit per-stage (``stage_widths``) and per-block
(``block_widths``) channel counts, so a filter-pruned, physically smaller net is rebuilt from its
``arch_kwargs`` alone. Downsampling shortcuts are 1x1 conv + BN, so each stage's residual stream is
its own channel group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from carddeck.errors import InvalidInput
from carddeck.nets.common import DEFAULT_MEAN, DEFAULT_STD, NETS, Normalize


@dataclass
class ChannelGroup:
    """Channels that must be pruned together: the outputs of ``producers`` (conv, bn) read by ``consumers``.

    Removing channel c means removing filter c of every producer conv (and its BN entries) and
    input channel c of every consumer (conv or linear). Names are ``named_modules`` names.
    """

    name: str
    size: int
    producers: list[tuple[str, str]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int, affine_bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch, affine=affine_bn)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, affine=affine_bn)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch, affine=affine_bn)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Post-activation CIFAR ResNet with explicit channel counts."""

    def __init__(
        self,
        blocks: Sequence[int],
        stage_widths: Sequence[int],
        block_widths: Sequence[int],
        num_classes: int,
        affine_bn: bool = True,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
    ) -> None:
        super().__init__()
        if len(stage_widths) != len(blocks) or len(block_widths) != sum(blocks):
            raise InvalidInput(
                f"need {len(blocks)} stage_widths and {sum(blocks)} block_widths, "
                f"got {len(stage_widths)} and {len(block_widths)}"
            )
        if min(*stage_widths, *block_widths) < 1:
            raise InvalidInput("every stage and block width must be at least 1")
        self.blocks = tuple(blocks)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, stage_widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_widths[0], affine=affine_bn)
        stages = []
        in_ch, k = stage_widths[0], 0
        for s, (n, out_ch) in enumerate(zip(blocks, stage_widths)):
            stage = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                stage.append(BasicBlock(in_ch, block_widths[k], out_ch, stride, affine_bn))
                in_ch, k = out_ch, k + 1
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def channel_groups(self) -> list[ChannelGroup]:
        """The prunable channel groups: one residual stream per stage, one inner group per block."""
        groups: list[ChannelGroup] = []
        for s, stage in enumerate(self.stages):
            stream = ChannelGroup(f"stage{s}", stage[0].bn2.num_features)
            if s == 0:  # the stem writes stage 0's stream, which block 0 reads
                stream.producers.append(("conv1", "bn1"))
                stream.consumers.append("stages.0.0.conv1")
            for b, block in enumerate(stage):
                prefix = f"stages.{s}.{b}"
                if isinstance(block.shortcut, nn.Sequential):
                    stream.producers.append((f"{prefix}.shortcut.0", f"{prefix}.shortcut.1"))
                stream.producers.append((f"{prefix}.conv2", f"{prefix}.bn2"))
                if b + 1 < len(stage):
                    stream.consumers.append(f"stages.{s}.{b + 1}.conv1")
                inner = ChannelGroup(f"block{s}.{b}", block.bn1.num_features, [(f"{prefix}.conv1", f"{prefix}.bn1")])
                inner.consumers.append(f"{prefix}.conv2")
                groups.append(inner)
            if s + 1 < len(self.stages):
                stream.consumers += [f"stages.{s + 1}.0.conv1", f"stages.{s + 1}.0.shortcut.0"]
            else:
                stream.consumers.append("fc")
            groups.append(stream)
        return groups


class PreActBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, affine_bn: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, affine=affine_bn)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, affine=affine_bn)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        affine_bn: bool = True,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        stages = []
        in_ch = widths[0]
        for s, (n, out_ch) in enumerate(zip(blocks, widths)):
            stage = []
            for b in range(n):
                stage.append(PreActBlock(in_ch, out_ch, 2 if (s > 0 and b == 0) else 1, affine_bn))
                in_ch = out_ch
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_ch, affine=affine_bn)
        self.fc = nn.Linear(in_ch, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.conv1(self.normalize(x)))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _scaled(base: Sequence[int], width: float) -> list[int]:
    if not width > 0:
        raise InvalidInput(f"width must be positive, got {width}")
    return [max(1, int(round(c * width))) for c in base]


def _resnet(
    blocks: Sequence[int],
    base: Sequence[int],
    num_classes: int,
    width: float,
    stage_widths: Sequence[int] | None,
    block_widths: Sequence[int] | None,
    affine_bn: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> ResNet:
    stages = list(stage_widths) if stage_widths is not None else _scaled(base, width)
    if block_widths is None:
        block_widths = [w for n, w in zip(blocks, stages) for _ in range(n)]
    return ResNet(blocks, stages, list(block_widths), num_classes, affine_bn, mean, std)


@NETS.register("resnet20")
def resnet20(
    num_classes: int,
    width: float = 1.0,
    stage_widths: Sequence[int] | None = None,
    block_widths: Sequence[int] | None = None,
    affine_bn: bool = True,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> ResNet:
    return _resnet((3, 3, 3), (16, 32, 64), num_classes, width, stage_widths, block_widths, affine_bn, mean, std)


@NETS.register("resnet18")
def resnet18(
    num_classes: int,
    width: float = 1.0,
    stage_widths: Sequence[int] | None = None,
    block_widths: Sequence[int] | None = None,
    affine_bn: bool = True,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> ResNet:
    base = (64, 128, 256, 512)
    return _resnet((2, 2, 2, 2), base, num_classes, width, stage_widths, block_widths, affine_bn, mean, std)


@NETS.register("preact-wrn18")
def preact_wrn18(
    num_classes: int,
    width: float = 2.0,
    affine_bn: bool = True,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), _scaled((64, 128, 256, 512), width), num_classes, affine_bn, mean, std)
