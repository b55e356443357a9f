"""L-OBS's second-order step, DSA's allocations and search, DiP-GO's gates, MACs and removal."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carddeck.compress.allocation import (
    Candidate,
    allocate,
    exact_counts,
    global_magnitude,
    layer_sizes,
    layer_stats,
    random_expr,
    search,
    uniform,
)
from carddeck.compress.dipgo import DiPGO, gated, mac_terms, macs
from carddeck.compress.methods import MethodConfig
from carddeck.compress.obs import DAMP, layer_hessians, obs_prune, reconstruction_error
from carddeck.data.datasets import load_dataset
from carddeck.nets import build_net, count_flops, prunable_modules
from tests.compress.test_methods import _filter_net


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen) + 0.3


def test_obs_on_one_linear_layer_removes_the_least_salient_weight_with_the_closed_form_correction():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    x = _correlated_inputs(500, 6)
    h = (x.T @ x / len(x)).double()
    pruned, keep = obs_prune(layer.weight, h, 1)

    hd = h + DAMP * h.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    w = layer.weight.detach().double()
    saliency = w.pow(2) / (2 * hinv.diagonal())
    row, q = divmod(int(saliency.argmin()), 6)
    assert (~keep).nonzero().tolist() == [[row, q]]  # exactly the least salient weight
    expected = w.clone()
    expected[row] -= w[row, q] / hinv[q, q] * hinv[:, q]  # OBS: dw = -w_q / [H^-1]_qq H^-1 e_q
    assert expected[row, q].abs() < 1e-12
    torch.testing.assert_close(pruned.double(), expected, rtol=1e-5, atol=1e-6)
    # only the pruned weight's row moves
    others = [r for r in range(4) if r != row]
    assert torch.equal(pruned[others], layer.weight.detach()[others])


def test_the_conv_hessian_gives_the_layer_output_error():
    """H from unfolded patches: dw H dw^T is the mean squared change of the conv's outputs."""
    net = build_net("resnet20", 10, width=0.25).eval()
    images = load_dataset("digits32", "train").images[:16]
    name = "stages.1.0.conv1"  # a strided conv
    conv = dict(net.named_modules())[name]
    h = layer_hessians(net, [name], images, torch.device("cpu"), batch_size=5)[name]
    inputs = []
    handle = conv.register_forward_hook(lambda _m, inp, _out: inputs.append(inp[0]))
    with torch.no_grad():
        net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    handle.remove()
    w2 = conv.weight.detach() * (torch.rand_like(conv.weight) > 0.5)
    with torch.no_grad():
        diff = F.conv2d(inputs[0], conv.weight - w2, stride=conv.stride, padding=conv.padding)
    per_position = diff.pow(2).sum(dim=1).mean()  # over images and output positions
    assert reconstruction_error(conv.weight, w2, h) == pytest.approx(float(per_position), rel=1e-4)


def test_lobs_reconstruction_error_is_below_magnitude_pruning_at_the_same_sparsity():
    net = _filter_net()
    images = load_dataset("digits32", "train").images[:64]
    names = ["conv1", "stages.0.1.conv2", "stages.2.0.conv1", "stages.2.2.conv2", "fc"]
    hessians = layer_hessians(net, names, images, torch.device("cpu"))
    modules = dict(net.named_modules())
    for sparsity in (0.5, 0.9):
        for name in names:
            w = modules[name].weight.detach()
            count = int(round(sparsity * w.numel()))
            obs, keep = obs_prune(w, hessians[name], count)
            assert int((~keep).sum()) == count and int((obs == 0).sum()) >= count
            threshold = w.abs().flatten().kthvalue(count).values
            mag = w * (w.abs() > threshold)
            e_obs = reconstruction_error(w, obs, hessians[name])
            e_mag = reconstruction_error(w, mag, hessians[name])
            assert e_obs < e_mag, (name, sparsity, e_obs, e_mag)


@pytest.mark.parametrize("target", [0.3, 0.9, 0.95])
def test_dsa_allocations_hit_the_target_within_one_weight_per_layer(target):
    net = build_net("resnet20", 10, width=0.5)
    sizes, stats = layer_sizes(net), layer_stats(net)
    total = sum(sizes.values())
    rng = np.random.default_rng(1)
    for _ in range(30):
        cand = Candidate(random_expr(rng, 3), float(rng.choice([0.1, 0.4, 0.8])))
        counts = allocate(cand, stats, sizes, target)
        assert abs(sum(counts.values()) - target * total) <= 1  # the mean, to the weight
        assert all(0 <= counts[n] < sizes[n] for n in sizes)
    for counts in (uniform(sizes, target), global_magnitude(net, target)):
        assert sum(counts.values()) == round(target * total)
    # rounding real shares: every layer within one weight of its share, the total exact
    shares = {n: target * s + 0.37 * (-1) ** i for i, (n, s) in enumerate(sizes.items())}
    counts = exact_counts(sizes, shares, round(sum(shares.values())))
    assert all(abs(counts[n] - shares[n]) < 1 for n in sizes)


def test_dsa_search_is_seeded_and_finds_a_better_allocation_than_uniform():
    net = build_net("resnet20", 10, width=0.5)
    sizes, stats = layer_sizes(net), layer_stats(net)
    names = list(sizes)

    def fitness(counts):  # prefers pruning the deep layers harder than the shallow ones
        s = np.array([counts[n] / sizes[n] for n in names])
        return float(np.corrcoef(np.arange(len(s)), s)[0, 1]) if s.std() > 0 else 0.0

    runs = [search(stats, sizes, 0.9, fitness, seed=3, population=6, generations=3) for _ in range(2)]
    assert runs[0].best == runs[1].best and runs[0].counts == runs[1].counts
    assert runs[0].history == sorted(runs[0].history)  # elitism: the best never gets worse
    assert runs[0].fitness > fitness(uniform(sizes, 0.9)) + 0.5
    other = search(stats, sizes, 0.9, fitness, seed=4, population=6, generations=3)
    assert sum(other.counts.values()) == sum(runs[0].counts.values())


def test_mac_terms_count_what_count_flops_counts():
    net = _filter_net()
    groups = net.channel_groups()
    terms = mac_terms(net, groups, 32, 32)
    assert macs(terms, {g.name: g.size for g in groups}) == count_flops(net)
    widths = {g.name: max(1, g.size // 3) for g in groups}
    small = build_net(
        "resnet20",
        10,
        stage_widths=[widths[g.name] for g in groups if g.name.startswith("stage")],
        block_widths=[widths[g.name] for g in groups if g.name.startswith("block")],
    )
    assert macs(terms, widths) == count_flops(small)


def test_dipgo_reaches_its_macs_target_and_the_removed_net_computes_what_the_gated_one_did():
    net = _filter_net()
    dense_flops = count_flops(net)
    data = load_dataset("digits32", "train")
    method = DiPGO(MethodConfig(sparsity=0.5, gate_steps=15, pretrained=True, seed=0))
    method.check("resnet20", net)
    method.prepare(net)
    original = copy.deepcopy(net).eval()
    method.calibrate(net, data.images[:64], data.labels[:64], torch.device("cpu"))
    pruned_modules = dict(net.named_modules())
    for name, bn in original.named_modules():  # calibrate re-estimated the BatchNorm statistics
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(pruned_modules[name].running_mean)
            bn.running_var.copy_(pruned_modules[name].running_var)
    final = method.finalize(net, "resnet20", {"width": 0.5})
    ratio = count_flops(final.model) / dense_flops
    assert ratio == pytest.approx(0.5, rel=0.02)
    assert method.macs_ratio == pytest.approx(ratio)
    streams = [g for g in method.groups if g.name.startswith("stage")]
    assert streams and all(bool(method.keep[g.name].all()) for g in streams)  # only inner channels are gated
    assert 0 < final.sparsity < 1
    x = torch.rand(5, 3, 32, 32)
    hard = {g: (lambda k=k: k.float()) for g, k in method.keep.items()}
    with torch.no_grad(), gated(original, method.groups, hard):
        expected = original(x)  # the dense weights, units switched off by the gates
    small = final.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in original.parameters())
    assert set(prunable_modules(small)) == set(prunable_modules(original))


def test_batchnorm_recalibration_measures_the_pruned_net_on_the_images():
    from carddeck.compress.oneshot import recalibrate_batchnorm

    net = _filter_net().eval()
    images = load_dataset("digits32", "train").images[:40]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        net.conv1.weight.mul_(0.5)  # as pruning does: the stem's outputs shrink
        stem = net.conv1(net.normalize(x))
    weight = net.conv1.weight.clone()
    recalibrate_batchnorm(net, images, torch.device("cpu"), batch_size=20)  # equal batches: an exact mean
    assert not net.training and torch.equal(net.conv1.weight, weight)
    torch.testing.assert_close(net.bn1.running_mean, stem.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_batchnorm_recalibration_sees_the_spread_between_classes_of_a_sorted_split():
    """A split stored class by class (leaves32) must not give per-class batch variances: the re-estimate
    visits the images shuffled, so the running variance is the whole set's. Mutant: batches in stored order
    (each batch one level, variance ~0)."""
    from carddeck.compress.train import recalibrate_batchnorm

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1, bias=False), torch.nn.BatchNorm2d(1)).eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0 / 3)  # the channels' mean: a black image gives 0, a white one 1
    images = np.zeros((256, 8, 8, 3), np.uint8)
    images[128:] = 255  # two "classes", stored one after the other
    recalibrate_batchnorm(net, images, torch.device("cpu"), batch_size=64)
    assert not net.training
    assert float(net[1].running_mean) == pytest.approx(0.5, abs=1e-6)  # equal batches: the exact mean
    assert float(net[1].running_var) == pytest.approx(0.25, abs=0.03)  # the whole set's variance, not ~0
