"""Torch architectures, found by name: ``build_net(arch, num_classes, **arch_kwargs)``.

Every net takes float32 NCHW images in [0, 1] and normalizes inside (a first ``Normalize``
module with mean/std buffers), so an exported graph carries its own preprocessing.
"""

from __future__ import annotations

from carddeck.nets.common import NETS, Normalize, build_net, count_flops, count_params, prunable_modules
from carddeck.nets.resnet import ChannelGroup, PreActResNet, ResNet

__all__ = [
    "NETS",
    "ChannelGroup",
    "Normalize",
    "PreActResNet",
    "ResNet",
    "build_net",
    "count_flops",
    "count_params",
    "prunable_modules",
]
