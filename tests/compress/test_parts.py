"""The small parts: schedules, global top-k, masks that hold through optimizer steps."""

import pytest
import torch

from carddeck.compress.criteria import global_topk
from carddeck.compress.lrr import MagnitudePruning, prunable_weights
from carddeck.compress.masks import apply_masks, named_tensors
from carddeck.compress.methods import MethodConfig
from carddeck.compress.schedules import cubic_sparsity, lr_factor, lrr_round_sparsities
from carddeck.errors import InvalidInput
from carddeck.nets import build_net


def test_lrr_rounds_remove_a_fraction_of_the_remaining_weights():
    s = lrr_round_sparsities(0.9, 0.2)
    assert len(s) == 11 and s[-1] == 0.9
    assert s[:3] == pytest.approx([0.2, 0.36, 0.488])
    three = lrr_round_sparsities(0.9, rounds=3)
    assert len(three) == 3 and three[-1] == 0.9 and three[0] == pytest.approx(1 - 0.1 ** (1 / 3))
    assert lrr_round_sparsities(0.0) == []
    with pytest.raises(InvalidInput, match=r"\[0, 1\)"):
        lrr_round_sparsities(1.0)


def test_cubic_and_lr_schedules():
    assert cubic_sparsity(0, 100, 0.5, 0.9) == 0.5
    assert cubic_sparsity(50, 100, 0.5, 0.9) == pytest.approx(0.9 - 0.4 * 0.125)
    assert cubic_sparsity(100, 100, 0.5, 0.9) == cubic_sparsity(500, 100, 0.5, 0.9) == 0.9
    cos = lr_factor("cosine", 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    step = lr_factor("step", 100)
    assert [step(0), step(50), step(75)] == pytest.approx([1.0, 0.1, 0.01])
    with pytest.raises(InvalidInput, match="cosine, step, constant"):
        lr_factor("linear", 10)


def test_global_topk_keeps_an_exact_count_even_with_ties():
    scores = {"a": torch.ones(10), "b": torch.ones(3, 3)}
    masks = global_topk(scores, 7)
    assert sum(int(m.sum()) for m in masks.values()) == 7
    shrunk = global_topk({k: torch.rand_like(v) for k, v in scores.items()}, 5, eligible=masks)
    assert all(bool((shrunk[k] <= masks[k]).all()) for k in scores)  # only ever shrinks


@pytest.mark.parametrize("target", [0.5, 0.9, 0.97])
def test_lrr_reaches_the_target_sparsity_exactly(target):
    torch.manual_seed(0)
    net = build_net("resnet20", 10, width=0.25)
    method = MagnitudePruning(MethodConfig(sparsity=target, rounds=3))
    before = {n: t.detach().abs().clone() for n, t in named_tensors(net).items()}
    for r in range(1, method.num_rounds()):
        method.start_round(net, r, steps=1)
    names = prunable_weights(net)
    tensors = named_tensors(net)
    total = sum(tensors[n].numel() for n in names)
    zeros = sum(int((tensors[n] == 0).sum()) for n in names)
    assert zeros == round(target * total)  # global count: exact, so within one weight per layer
    # the survivors are the largest magnitudes: every kept |w| >= every pruned original |w|
    kept = torch.cat([before[n][tensors[n] != 0] for n in names])
    gone = torch.cat([before[n][tensors[n] == 0] for n in names])
    assert kept.min() >= gone.max()
    assert set(names) == {n for n in tensors if n.endswith(".weight") and tensors[n].dim() in (2, 4)}


def test_masked_weights_stay_zero_after_optimizer_steps():
    torch.manual_seed(0)
    net = build_net("resnet20", 10, width=0.25)
    method = MagnitudePruning(MethodConfig(sparsity=0.8, rounds=1))
    method.start_round(net, 1, steps=1)
    pruned = {n: ~m for n, m in method.masks.items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        moved = sum(int((named_tensors(net)[n][p] != 0).sum()) for n, p in pruned.items())
        assert moved > 0  # the optimizer alone does revive pruned weights (gradients, momentum) ...
        method.after_step(net)
        assert all(bool((named_tensors(net)[n][p] == 0).all()) for n, p in pruned.items())  # ... the mask holds


def test_apply_masks_broadcasts_filter_masks():
    net = build_net("resnet20", 10, width=0.25)
    keep = torch.tensor([True, False, True, False])
    apply_masks(net, {"conv1.weight": keep.view(-1, 1, 1, 1), "bn1.bias": keep})
    assert net.conv1.weight[1].abs().sum() == 0 and net.conv1.weight[0].abs().sum() > 0
