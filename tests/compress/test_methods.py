"""biprop's binary effective weights and filter pruning's exact physical removal."""

import pytest
import torch
from torch import nn

from carddeck.compress.biprop import Biprop
from carddeck.compress.criteria import filter_grad
from carddeck.compress.filters import FilterPruning
from carddeck.compress.methods import MethodConfig
from carddeck.nets import build_net, count_flops, prunable_modules


def _steps(net, method, n, lr=0.1):
    opt = torch.optim.SGD(method.trainable(net), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for step in range(n):
        x, y = torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)

        def grad_fn(x=x, y=y):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()

        method.before_step(net, 1, step, n, grad_fn)
        grad_fn()
        opt.step()
        method.after_step(net)


def test_biprop_trains_scores_only_and_bakes_weights_into_plus_minus_alpha():
    torch.manual_seed(0)
    net = build_net("resnet20", 10, width=0.25, affine_bn=False)
    method = Biprop(MethodConfig(sparsity=0.9))
    net = method.prepare(net)
    frozen = {n: m.weight.detach().clone() for n, m in prunable_modules(net).items()}
    scores = {n: m.scores.detach().clone() for n, m in prunable_modules(net).items()}
    assert all(p.requires_grad == n.endswith("scores") for n, p in net.named_parameters())
    _steps(net, method, 4)
    assert all(torch.equal(frozen[n], m.weight) for n, m in prunable_modules(net).items())
    assert any(not torch.equal(scores[n], m.scores) for n, m in prunable_modules(net).items())
    net.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)  # refreshes nothing: finalize sets the target-sparsity mask first
    final = method.finalize(net, "resnet20", {"width": 0.25, "affine_bn": False})
    plain = final.model.eval()
    assert type(plain.conv1) is nn.Conv2d  # an ordinary net of build_net, nothing biprop-specific
    kept = total = 0
    for name, m in prunable_modules(plain).items():
        w = m.weight.detach()
        alpha = w.abs().max()
        values = set(torch.unique(w).tolist())
        assert values <= {-alpha.item(), 0.0, alpha.item()}, name
        assert alpha > 0
        # alpha is the mean |w_init| over the kept weights
        keep = w != 0
        assert alpha.item() == pytest.approx(frozen[name].abs()[keep].mean().item(), rel=1e-5)
        assert torch.equal(torch.sign(w[keep]), torch.where(frozen[name][keep] >= 0, 1.0, -1.0))
        kept += int(keep.sum())
        total += w.numel()
    assert total - kept == round(0.9 * total)
    assert final.sparsity == pytest.approx(0.9, abs=1 / total)
    with torch.no_grad():
        method.set_masks(net, 0.9)
        torch.testing.assert_close(plain(x), net(x))
    assert expected.shape == (4, 10)


def test_biprop_ramps_global_sparsity_from_half_to_target():
    method = Biprop(MethodConfig(sparsity=0.9, ramp=0.5))
    assert method.target_at(0, 100) == 0.5
    assert 0.5 < method.target_at(25, 100) < 0.9
    assert method.target_at(50, 100) == method.target_at(99, 100) == 0.9
    assert Biprop(MethodConfig(sparsity=0.3)).target_at(0, 100) == 0.3


def _filter_net(seed=0):
    torch.manual_seed(seed)
    net = build_net("resnet20", 10, width=0.5)
    # non-trivial BN statistics and affine parameters, as after training
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def test_filter_pruned_net_is_smaller_and_computes_what_the_masked_net_did():
    net = _filter_net()
    dense_flops = count_flops(net)
    method = FilterPruning(MethodConfig(sparsity=0.5))
    method.prepare(net)
    method.start_round(net, 1, steps=1)  # one-shot L1 pruning of half the filters per group
    net.eval()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        masked = net(x)
    final = method.finalize(net, "resnet20", {"width": 0.5})
    small = final.model.eval()
    assert final.arch_kwargs["stage_widths"] == [4, 8, 16]
    assert final.arch_kwargs["block_widths"] == [4, 4, 4, 8, 8, 8, 16, 16, 16]
    assert small.conv1.out_channels == 4 and small.fc.in_features == 16
    assert sum(p.numel() for p in small.parameters()) < 0.3 * sum(p.numel() for p in net.parameters())
    assert count_flops(small) <= 0.5 * dense_flops
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked, rtol=1e-4, atol=1e-5)
    # and the masked net really differs from the unpruned one (the test can fail)
    with torch.no_grad():
        assert not torch.allclose(_filter_net().eval()(x), masked, atol=1e-3)
    assert final.sparsity == 0.5


def test_a_pruned_net_is_evaluated_with_batchnorm_re_estimated_on_the_training_images():
    """Before an evaluation (refresh) of the pruned net, every BatchNorm holds its statistics on ``bn_images``
    (what recalibrate_batchnorm measures on a net pruned the same way), not the unpruned net's. Mutant: no
    re-estimation (as before: a 1-epoch fine-tune left them mostly the unpruned net's, a card at chance)."""
    from carddeck.compress.train import recalibrate_batchnorm

    images = torch.randint(0, 256, (40, 32, 32, 3), generator=torch.Generator().manual_seed(3)).to(torch.uint8).numpy()
    net, ref = _filter_net(), _filter_net()

    def bns(model):
        return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    stale = [m.running_var.clone() for m in bns(net)]
    method, same = FilterPruning(MethodConfig(sparsity=0.5)), FilterPruning(MethodConfig(sparsity=0.5))
    method.prepare(net)
    same.prepare(ref)
    method.bn_images = images
    method.refresh(net)  # nothing pruned yet: the statistics stay
    assert all(torch.equal(m.running_var, v) for m, v in zip(bns(net), stale))
    method.start_round(net, 1, steps=1)
    method.refresh(net)
    same.prune_to(ref, 0.5)
    recalibrate_batchnorm(ref, images, torch.device("cpu"))
    for got, want in zip(bns(net), bns(ref)):
        torch.testing.assert_close(got.running_mean, want.running_mean)
        torch.testing.assert_close(got.running_var, want.running_var)
    assert not any(torch.allclose(m.running_var, v) for m, v in zip(bns(net), stale))
    for g in method.groups:  # pruned channels still output exactly zero: the masks hold after the re-estimation
        assert all(bool((dict(net.named_modules())[bn].running_mean[~method.keep[g.name]] == 0).all())
                   for _conv, bn in g.producers)  # fmt: skip


def test_filter_pruning_keeps_the_highest_l1_filters():
    net = _filter_net()
    w = net.stages[0][0].conv1.weight
    with torch.no_grad():
        w[3].mul_(100.0)  # filter 3 of block0.0 is now by far the largest
        w[1].mul_(0.0)
    method = FilterPruning(MethodConfig(sparsity=0.5))
    method.prepare(net)
    method.start_round(net, 1, steps=1)
    keep = method.keep["block0.0"]
    assert keep[3] and not keep[1] and int(keep.sum()) == 4


def test_regeneration_reads_gradients_of_pruned_filters_and_keeps_the_count():
    net = _filter_net()
    method = FilterPruning(MethodConfig(sparsity=0.5, regrow=0.5))
    method.prepare(net)
    method.prune_to(net, 0.5)
    before = {k: v.clone() for k, v in method.keep.items()}
    bn_stats = [m.running_mean.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    grads = {}

    def grad_fn():
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        for g in method.groups:
            grads[g.name] = filter_grad(net, g)

    net.train()
    method.regenerate(net, 0.5, grad_fn)
    # the scoring pass left the running statistics alone (pruned channels are re-zeroed anyway)
    after_stats = [m.running_mean for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for a, b, g in zip(bn_stats, after_stats, range(len(bn_stats))):
        nz = b != 0
        torch.testing.assert_close(a[nz], b[nz], msg=f"bn {g}")
    changed = 0
    for g in method.groups:
        assert int(method.keep[g.name].sum()) == int(before[g.name].sum())  # same count
        pruned = ~before[g.name]
        assert grads[g.name][pruned].abs().sum() > 0  # gradients of zeroed filters are not blocked
        grown = method.keep[g.name] & pruned
        if grown.any():
            changed += 1
            # regrown channels are the pruned ones with the largest gradient sums
            top = torch.topk(grads[g.name].masked_fill(~pruned, -1), int(grown.sum())).indices
            assert set(top.tolist()) == set(torch.nonzero(grown).flatten().tolist())
    assert changed > 0
    # masks still hold: pruned channels output zero
    modules = dict(net.named_modules())
    for g in method.groups:
        for conv, _bn in g.producers:
            assert modules[conv].weight[~method.keep[g.name]].abs().sum() == 0


def test_regrown_channels_leave_the_function_unchanged_until_trained():
    net = _filter_net()
    method = FilterPruning(MethodConfig(sparsity=0.5, regrow=0.5))
    method.prepare(net)
    method.prune_to(net, 0.5)
    net.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = net(x)
        modules = dict(net.named_modules())
        for g in method.groups:  # regrow every pruned channel of every group
            idx = torch.nonzero(~method.keep[g.name]).flatten()
            method.keep[g.name][idx] = True
            method._reset_channels(modules, g, idx)
            conv = modules[g.producers[0][0]]
            assert conv.weight[idx].abs().sum() > 0  # the filters really are back
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
