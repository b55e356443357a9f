"""Architectures: registry, shapes, in-graph normalization, channel groups and cost counters."""

import pytest
import torch
from torch import nn

from carddeck.errors import InvalidInput
from carddeck.nets import NETS, Normalize, build_net, count_flops, count_params

torch.set_num_threads(1)  # the CI box is shared; one thread avoids oversubscription


def test_registry_names_match_the_contract():
    assert set(NETS.names()) == {"resnet20", "resnet18", "preact-wrn18"}


@pytest.mark.parametrize(
    "arch, kwargs", [("resnet20", {}), ("resnet18", {"width": 0.125}), ("preact-wrn18", {"width": 0.125})]
)
def test_every_net_maps_unit_images_to_logits_and_normalizes_first(arch, kwargs):
    net = build_net(arch, 7, **kwargs).eval()
    first = next(iter(net.children()))
    assert isinstance(first, Normalize)
    assert {"normalize.mean", "normalize.std"} <= set(net.state_dict())
    x = torch.rand(3, 3, 32, 32)
    assert net(x).shape == (3, 7)
    # the normalization is really applied: changing the buffers changes the logits
    before = net(x)
    net.normalize.mean.fill_(0.9)
    assert not torch.allclose(before, net(x))


def test_width_multiplier_scales_channels():
    assert build_net("resnet18", 10).conv1.out_channels == 64
    wide = build_net("resnet18", 10, width=2)  # the paper's LRR architecture
    assert wide.conv1.out_channels == 128 and wide.fc.in_features == 1024
    assert build_net("resnet20", 10, width=0.5).fc.in_features == 32


def test_preact_wrn18_non_affine_batchnorm_has_no_bn_parameters():
    net = build_net("preact-wrn18", 10, width=0.125, affine_bn=False)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.weight is None and m.bias is None for m in bns)
    assert build_net("preact-wrn18", 10).conv1.out_channels == 128  # wide (x2) by default


def test_explicit_channel_counts_rebuild_a_smaller_net():
    net = build_net("resnet20", 10, stage_widths=[8, 16, 20], block_widths=[3, 4, 5, 6, 7, 8, 9, 10, 11])
    assert net.conv1.out_channels == 8 and net.fc.in_features == 20
    assert [b.conv1.out_channels for s in net.stages for b in s] == [3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_channel_groups_cover_every_conv_once_as_producer():
    net = build_net("resnet20", 10, width=0.25)
    producers = [conv for g in net.channel_groups() for conv, _ in g.producers]
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(producers) == sorted(convs)
    consumers = [c for g in net.channel_groups() for c in g.consumers]
    assert sorted(consumers) == sorted([*(c for c in convs if c != "conv1"), "fc"])


def test_bad_arch_or_option_lists_valid_choices():
    with pytest.raises(InvalidInput, match="resnet18, resnet20"):
        build_net("vgg16", 10)
    with pytest.raises(InvalidInput, match="accepted: width"):
        build_net("resnet20", 10, depth=56)
    with pytest.raises(InvalidInput, match="num_classes"):
        build_net("resnet20", 1)
    with pytest.raises(InvalidInput, match="width"):
        build_net("resnet20", 10, width=0)


def test_counters_match_hand_counts():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    assert count_flops(net, 8, 8) == 3 * 4 * 9 * 64 + 256 * 2
    with torch.no_grad():
        net[0].weight.zero_()
    assert count_flops(net, 8, 8, sparse=True) == 256 * 2
    total, nonzero = count_params(net)
    assert total == 108 + 512 + 2 and nonzero == total - 108
