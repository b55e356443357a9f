"""The adaptive rewrite of a folded card equals BatchNorm re-estimation (Schneider et al.) in torch.

A width-0.25 ResNet-20 whose BatchNorm running statistics are exactly the clean reference images'
statistics is exported the way cards are (BN folded into the convs). Torch then renormalises every
BN with the shifted batch's statistics mixed with the stored ones at pseudo sample size N; the ONNX
rewrite must give the same logits from the exported file and the reference images alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from carddeck.deck.adapt import adaptable_convs, adaptive_model, build_adaptive, reference_statistics

torch = pytest.importorskip("torch")


def _run(model: onnx.ModelProto | bytes, x: np.ndarray) -> np.ndarray:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": x})[0]


def _bns(model: torch.nn.Module, x: torch.Tensor) -> list[torch.nn.BatchNorm2d]:
    """BatchNorm layers in the order the forward pass calls them."""
    order: list[torch.nn.BatchNorm2d] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, _: order.append(m))
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return order


def _set_running_stats(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Running statistics = the exact (biased) statistics of each BN's input on ``x``, layer by
    layer in eval mode, so clean data through the eval model is what the reference images say."""
    for bn in _bns(model, x):
        seen: list[torch.Tensor] = []
        hook = bn.register_forward_pre_hook(lambda m, inp, seen=seen: seen.append(inp[0]))
        with torch.no_grad():
            model(x)
        hook.remove()
        z = seen[0].double()
        bn.running_mean.copy_(z.mean(dim=(0, 2, 3)).float())
        bn.running_var.copy_(z.var(dim=(0, 2, 3), unbiased=False).float())


def _mixed_bn_forward(model: torch.nn.Module, x: torch.Tensor, prior: float) -> np.ndarray:
    """Schneider et al.'s estimator in torch: every BN uses (N * stored + n * batch) / (N + n)."""
    n = len(x)

    def forward(bn: torch.nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
        mean_b, var_b = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)
        mean = (prior * bn.running_mean + n * mean_b) / (prior + n)
        var = (prior * bn.running_var + n * var_b) / (prior + n)
        out = (z - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
        return out * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]

    originals = {}
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        originals[bn] = bn.forward
        bn.forward = lambda z, bn=bn: forward(bn, z)  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            return model(x).numpy()
    finally:
        for bn, f in originals.items():
            bn.forward = f  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def folded() -> tuple[torch.nn.Module, onnx.ModelProto, np.ndarray, np.ndarray]:
    from carddeck.export.onnx_export import to_onnx
    from carddeck.nets.resnet import resnet20

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = resnet20(10, width=0.25).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        with torch.no_grad():  # BN's affine parameters away from their (1, 0) start, as after training
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    clean = rng.uniform(0.2, 0.8, (96, 3, 32, 32)).astype(np.float32)
    _set_running_stats(model, torch.from_numpy(clean))
    shifted = np.clip(0.4 * clean[:12] + 0.5 + rng.normal(0, 0.05, clean[:12].shape), 0, 1).astype(np.float32)
    return model, to_onnx(model, 32, 32), clean, shifted


def test_every_folded_conv_is_adaptable(folded) -> None:
    model, proto, _, _ = folded
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded by export
    assert len(adaptable_convs(proto)) == convs == 21


def test_reference_statistics_reproduce_the_card_on_clean_data(folded) -> None:
    """With the stored statistics weighing ~infinitely, the adaptive card is the card."""
    _, proto, clean, shifted = folded
    stats = reference_statistics(proto, clean)
    np.testing.assert_allclose(_run(adaptive_model(proto, stats, prior=1e9), shifted), _run(proto, shifted), atol=1e-4)


@pytest.mark.parametrize("prior", [0.0, 16.0])
def test_rewrite_equals_batchnorm_reestimation(folded, prior: float) -> None:
    model, proto, clean, shifted = folded
    adapted = _run(adaptive_model(proto, reference_statistics(proto, clean), prior), shifted)
    expected = _mixed_bn_forward(model, torch.from_numpy(shifted), prior)
    unadapted = _run(proto, shifted)
    assert np.abs(unadapted - expected).max() > 0.1  # the shift matters, so the match below means something
    np.testing.assert_allclose(adapted, expected, atol=2e-3, rtol=1e-3)


def test_each_row_depends_on_the_whole_batch_and_nothing_else(folded) -> None:
    """Batch statistics: a row's answer changes with its batch-mates, and is the same whenever the
    batch is the same (no state kept between runs)."""
    _, proto, clean, shifted = folded
    adaptive = build_adaptive(proto.SerializeToString(), clean, prior=0.0)
    assert adaptive is not None
    session = ort.InferenceSession(adaptive, providers=["CPUExecutionProvider"])
    first = session.run(["logits"], {"images": shifted})[0]
    session.run(["logits"], {"images": clean[:40]})
    again = session.run(["logits"], {"images": shifted})[0]
    np.testing.assert_array_equal(first, again)
    mixed = session.run(["logits"], {"images": np.concatenate([shifted, clean[:12]])})[0]
    assert np.abs(mixed[:12] - first).max() > 1e-3


def test_a_card_without_convolutions_has_no_adaptive_variant() -> None:
    from tests.cards import tiny_card, tiny_meta

    model = tiny_card(tiny_meta()).SerializeToString()
    assert build_adaptive(model, np.zeros((4, 3, 32, 32), np.float32)) is None


def test_each_real_card_variant_is_the_card_when_the_stored_statistics_dominate() -> None:
    """Every card of the default deck (int8 QDQ biprop, low-rank LRR, filter-pruned): with the reference
    statistics weighing ~infinitely the adaptive variant gives the card's logits on a shifted batch, and
    at N=0 it does not. Kills a rewrite that renormalises the wrong tensor (a low-rank factor, the
    quantised copy) or a reference taken after the QuantizeLinear clamp."""
    from carddeck.data.corruptions import corrupt
    from carddeck.data.datasets import load_dataset
    from carddeck.deck import Deck, DeckStore
    from carddeck.deck.default import default_deck_path

    deck = Deck.open(default_deck_path())
    store = DeckStore(default_deck_path())
    calibration = store.calibration_images()
    assert calibration is not None
    clean = deck.prepare(calibration)
    shifted = deck.prepare(corrupt(load_dataset("digits32", "test").images[:32], "contrast", 5, seed=0))
    for name in deck.card_names:
        proto = onnx.load_from_string(store.read_model(deck.manifest.find(name)))
        stats = reference_statistics(proto, clean)
        assert stats, name
        plain = _run(proto, shifted)
        scale = np.abs(plain).max()
        # QDQ cards: ORT fuses the original's Q/DQ around each conv, the variant's conv runs in float
        np.testing.assert_allclose(_run(adaptive_model(proto, stats, prior=1e12), shifted), plain, atol=0.02 * scale)
        assert np.abs(_run(adaptive_model(proto, stats, prior=0.0), shifted) - plain).max() > 0.05 * scale, name
