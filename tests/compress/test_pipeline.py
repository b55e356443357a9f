"""`carddeck compress` end to end on a tiny slice of digits32: card.pt format, resume, bad input."""

import json
import logging
from pathlib import Path

import pytest
import torch

from carddeck.card import CardMeta
from carddeck.commands.cli import main
from carddeck.compress import CARD_FORMAT, CompressConfig, compress, load_card, plan
from carddeck.data.datasets import load_dataset
from carddeck.errors import InvalidInput
from carddeck.nets import build_net, count_flops, prunable_modules

TINY = ["--arch", "resnet20", "--width", "0.25", "--epochs", "1", "--batch-size", "32", "--no-progress"]
FAST_EVAL = ["--corruptions", "gaussian_noise,contrast", "--severities", "1,5"]


@pytest.mark.parametrize(
    "method, extra",
    [
        ("lrr", ["--sparsity", "0.8", "--rounds", "1", "--domain", "gaussian"]),
        ("biprop", ["--sparsity", "0.9", "--domain", "augmix", "--jsd"]),
        ("filter", ["--sparsity", "0.5", "--regrow", "0.2", "--epochs", "2"]),
    ],
)
def test_compress_cli_writes_a_card_export_can_read(tmp_path, tiny_data, method, extra, capsys):
    out = tmp_path / method
    assert (
        main(["compress", *TINY, "--data", tiny_data, "--method", method, "--out", str(out), *FAST_EVAL, *extra]) == 0
    )
    assert method in capsys.readouterr().out
    card = torch.load(out / "card.pt", map_location="cpu", weights_only=True)
    assert set(card) == {"format", "arch", "arch_kwargs", "state_dict", "meta"}
    assert card["format"] == CARD_FORMAT and card["arch"] == "resnet20"
    meta = CardMeta.from_dict(card["meta"])
    assert CardMeta.from_json((out / "card.json").read_text()) == meta
    assert meta.compression.method == method and meta.signature is None
    assert meta.compression.weight_bits == (1 if method == "biprop" else 32)
    assert meta.compression.structured == (method == "filter")
    assert 0 <= meta.accuracy.clean <= 1 and 0 <= meta.accuracy.corrupted <= 1
    assert meta.provenance.dataset == tiny_data and meta.provenance.seed == 0
    assert meta.input.mean == tuple(card["arch_kwargs"]["mean"])
    # a plain build_net model with the effective weights, exactly as the contract says
    net = build_net(card["arch"], meta.num_classes, **card["arch_kwargs"])
    net.load_state_dict(card["state_dict"])
    weights = [m.weight for m in prunable_modules(net).values()]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    if method == "filter":
        assert meta.compression.sparsity == 0.5 and card["arch_kwargs"]["stage_widths"] == [2, 4, 8]
    else:
        assert zeros == pytest.approx(meta.compression.sparsity, abs=1e-4)
    if method == "biprop":
        assert all(len(torch.unique(w.abs())) <= 2 for w in weights)  # {0, alpha} per layer
    loaded, loaded_meta, _ = load_card(out)
    data = load_dataset(tiny_data, "val")
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    acc = float((loaded(x).argmax(1).numpy() == data.labels).mean())
    assert acc == pytest.approx(meta.accuracy.clean) and loaded_meta == meta


def _config(out: Path, data: str, **kw) -> CompressConfig:
    base = dict(arch="resnet20", width=0.25, data=data, method="lrr", sparsity=0.7, rounds=1, epochs=2)
    base.update(batch_size=32, corruptions=(), progress=False, out=out)
    base.update(kw)
    return CompressConfig(**base)


class Interrupt(Exception):
    pass


def test_a_checkpoint_resumes_to_the_same_result(tmp_path, tiny_data):
    straight = compress(_config(tmp_path / "straight", tiny_data))
    assert [(h["round"], h["epoch"]) for h in straight.history] == [(0, 1), (0, 2), (1, 1), (1, 2)]

    def stop_after_third(pos, record):
        if (pos.round, pos.epoch) == (1, 1):  # mid-round: optimizer, schedule and mask must all resume
            raise Interrupt

    with pytest.raises(Interrupt):
        compress(_config(tmp_path / "cut", tiny_data), on_epoch_end=stop_after_third)
    assert not (tmp_path / "cut" / "card.pt").exists()
    resumed = compress(_config(tmp_path / "cut", tiny_data, resume=True))
    assert len(resumed.history) == 4
    a = torch.load(straight.card, weights_only=True)["state_dict"]
    b = torch.load(resumed.card, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.meta.accuracy.clean == straight.meta.accuracy.clean

    with pytest.raises(InvalidInput, match="different settings.*lr"):
        compress(_config(tmp_path / "cut", tiny_data, resume=True, lr=0.05))


def test_lrr_from_a_dense_card_skips_dense_training(tmp_path, tiny_data):
    dense = compress(_config(tmp_path / "dense", tiny_data, method="dense", sparsity=0.0, epochs=1))
    assert dense.meta.compression.method == "dense" and dense.nonzeros == dense.params
    lrr = compress(_config(tmp_path / "lrr", tiny_data, init=dense.card, epochs=1))
    assert [h["round"] for h in lrr.history] == [1]
    assert lrr.meta.compression.sparsity == pytest.approx(0.7, abs=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "vgg16"], "valid choices: preact-wrn18, resnet18, resnet20"),
        (["--method", "prune"], "valid choices: biprop, dense, dipgo, dsa, filter, lobs, lrr"),
        (["--domain", "fog"], "valid choices: augmix, clean, gaussian"),
        (["--method", "lrr", "--sparsity", "1.0"], r"sparsity must be in \[0.0, 1.0\)"),
        (["--method", "lrr", "--sparsity", "-0.1"], r"sparsity must be in \[0.0, 1.0\)"),
        (["--method", "dense", "--sparsity", "0.5"], "dense"),
        (["--batch-size", "5000"], "1078 training images, fewer than --batch-size 5000"),
        (["--arch", "preact-wrn18", "--method", "filter", "--sparsity", "0.5"], "resnet20, resnet18"),
        (["--jsd"], "valid with: augmix, gaussian"),
        (["--corruptions", "rain"], "valid choices: brightness"),
        (["--device", "tpu"], "valid choices: auto, cpu, cuda"),
        (["--arch-kw", "depth=56"], "accepted: width"),
        (["--schedule", "linear"], "cosine, step, constant"),
        (["--method", "lobs", "--sparsity", "0.9"], "prunes a trained dense card: pass --init"),
        (["--method", "dipgo", "--sparsity", "0.5"], "pass --init"),
        (
            ["--method", "dsa", "--sparsity", "0.9", "--init", "d.pt", "--calib-images", "8"],
            r"--calib-images must be between 32 and 1078",
        ),
        (["--method", "lobs", "--sparsity", "0.9", "--init", "d.pt", "--calib-images", "5000"], "between 32 and 1078"),
        (["--method", "lobs", "--sparsity", "0.0", "--init", "d.pt"], r"needs --sparsity in \(0, 1\)"),
        (["--method", "dipgo", "--sparsity", "1.5", "--init", "d.pt"], r"sparsity must be in \[0.0, 1.0\)"),
        (
            ["--method", "lobs", "--sparsity", "0.9", "--init", "d.pt", "--allocation", "layerwise"],
            "valid choices: uniform, global, dsa",
        ),
        (["--method", "dsa", "--sparsity", "0.9", "--init", "d.pt", "--allocation", "uniform"], "is for lobs"),
        (["--method", "lrr", "--sparsity", "0.9", "--calib-images", "64"], "is for methods dipgo, dsa, lobs"),
        (["--method", "dsa", "--sparsity", "0.9", "--init", "d.pt", "--population", "1"], "--population must be"),
        (["--method", "dipgo", "--sparsity", "0.5", "--init", "d.pt", "--gate-steps", "0"], "--gate-steps must be"),
        (["--method", "dipgo", "--sparsity", "0.5", "--init", "d.pt", "--regrow", "0.2"], "--regrow is for"),
        (["--method", "lrr", "--sparsity", "0.9", "--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_bad_input_fails_before_training_and_names_the_choices(tmp_path, capsys, args, message):
    argv = ["compress", "--arch", "resnet20", "--data", "digits32", "--out", str(tmp_path / "x"), "--no-progress"]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert "carddeck: error:" in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_card_json_is_the_card_meta(tmp_path, tiny_data):
    result = compress(_config(tmp_path / "b", tiny_data, method="biprop", sparsity=0.5, rounds=None, epochs=1))
    meta = json.loads((tmp_path / "b" / "card.json").read_text())
    assert meta["compression"] == {"method": "biprop", "sparsity": 0.5, "structured": False, "weight_bits": 1}
    assert meta["domain"] == "clean" and meta["accuracy"]["corrupted"] is None
    assert result.meta.name == "resnet20-clean-biprop"


def test_cli_help_names_match_the_registries():
    from carddeck.commands.compress import ARCHS, DOMAIN_NAMES, METHOD_NAMES
    from carddeck.compress import METHODS
    from carddeck.data.domains import DOMAINS
    from carddeck.nets import NETS

    assert set(ARCHS) == set(NETS.names())
    assert set(METHOD_NAMES) == set(METHODS.names())
    assert set(DOMAIN_NAMES) == set(DOMAINS.names())


@pytest.mark.parametrize("arch, method", [("preact-wrn18", "biprop"), ("resnet18", "lrr"), ("resnet18", "filter")])
def test_the_larger_architectures_compress_too(tmp_path, tiny_data, arch, method):
    sparsity = 0.5 if method == "filter" else 0.9
    cfg = _config(tmp_path / arch, tiny_data, arch=arch, width=0.0625, method=method, sparsity=sparsity, epochs=1)
    result = compress(cfg)
    _model, meta, card = load_card(result.card)
    assert meta.architecture == arch and meta.compression.method == method
    if method == "biprop":
        assert card["arch_kwargs"]["affine_bn"] is False  # the binary CARDs' non-affine BatchNorm
    if method == "filter":
        assert result.flops <= 0.5 * count_flops(build_net(arch, 10, width=0.0625))


def test_cli_lobs_with_a_searched_allocation_and_no_retraining(tmp_path, tiny_data, capsys):
    dense = compress(_config(tmp_path / "dense", tiny_data, method="dense", sparsity=0.0, epochs=1))
    out = tmp_path / "lobs"
    argv = [*TINY, "--data", tiny_data, "--method", "lobs", "--sparsity", "0.9", "--init", str(dense.card)]
    argv += ["--allocation", "dsa", "--population", "2", "--generations", "1", "--calib-images", "32"]
    assert main(["compress", *argv, "--epochs", "0", "--corruptions", "none", "--out", str(out)]) == 0
    assert "lobs sparsity 0.9" in capsys.readouterr().out
    _model, meta, _card = load_card(out)
    assert meta.compression.allocation.endswith(("range 0.1", "range 0.2", "range 0.4", "range 0.8"))
    assert not (out / "checkpoint.pt").exists()  # no epoch was trained
    layers = meta.compression.layer_sparsity
    sizes = [m.weight.numel() for m in prunable_modules(_model).values()]
    pruned = sum(s * n for s, n in zip(layers, sizes))
    assert abs(pruned - 0.9 * sum(sizes)) <= 1


# -- what a new user gets wrong (session 11) -------------------------------------------------------------
def test_a_rerun_into_a_finished_or_interrupted_run_is_refused_unless_resumed(tmp_path, tiny_data, capsys):
    """Mutant: the CLI trains again over --out without --resume (as before), overwriting an interrupted run's
    epochs after its first epoch and a finished card at its end."""
    argv = ["compress", *TINY, "--data", tiny_data, "--method", "dense", "--corruptions", "none"]
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 0
    card = (out / "card.pt").read_bytes()
    first = torch.load(out / "card.pt", weights_only=True)["state_dict"]
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a run (card.pt, checkpoint.pt): pass --resume" in err, err
    assert (out / "card.pt").read_bytes() == card
    (out / "card.pt").unlink()  # as a run interrupted before its end leaves it: the checkpoint only
    assert main([*argv, "--out", str(out)]) == 2 and "(checkpoint.pt)" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--resume"]) == 0  # the same card again (but for its creation time)
    resumed = torch.load(out / "card.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, first[k]) for k, v in resumed.items())


def test_a_bad_init_or_out_is_named_before_training(tmp_path, tiny_data, capsys):
    """Mutants: torch.load's own error for a file that is no card (a traceback before); an --out under a
    file found only when the first epoch's checkpoint is written (after training)."""
    garbage = tmp_path / "card.pt"
    garbage.write_text("not a checkpoint\n")
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = ["compress", *TINY, "--data", tiny_data, "--corruptions", "none"]
    for args, message in (
        (["--method", "lrr", "--sparsity", "0.5", "--init", str(garbage), "--out", str(tmp_path / "o")],
         f"checkpoint {garbage}: unreadable"),
        (["--out", str(afile / "sub")], f"argument --out: {afile} is a file, not a directory"),
    ):  # fmt: skip
        try:
            code = main([*argv, *args])
        except SystemExit as exc:  # argparse's own refusal of a flag's value
            code = exc.code
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert "val acc" not in err  # nothing trained
    assert not (tmp_path / "o").exists()


def test_a_card_pruned_from_init_takes_the_init_cards_dataset(tmp_path, tiny_data, capsys):
    """--data defaults to the --init card's own dataset (CardMeta provenance), not to digits32; other data
    given explicitly is announced. Mutant: the constant default (digits32) with a card trained on other data."""
    dense = compress(_config(tmp_path / "dense", tiny_data, method="dense", sparsity=0.0, epochs=1))
    lrr = compress(_config(tmp_path / "lrr", None, init=dense.card, epochs=1))
    assert lrr.meta.provenance.dataset == tiny_data and lrr.meta.accuracy.split.startswith(f"{tiny_data}:val")
    capsys.readouterr()
    assert plan(_config(tmp_path / "other", "digits32", init=dense.card)).config.data == "digits32"
    assert f"WARNING: --init {dense.card} was trained on {tiny_data}, but --data digits32" in capsys.readouterr().err


def test_ctrl_c_keeps_the_last_epoch_and_says_how_to_go_on(tmp_path, tiny_data):
    """A real SIGINT to `carddeck compress` after its first epoch's checkpoint: exit 130, no traceback, no card,
    a line naming the checkpoint and --resume; the rerun with --resume finishes the run. Mutant: the interrupt
    handled silently (as before: exit 130 and nothing said)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "carddeck", "compress", *TINY[:4], "--epochs", "8", *TINY[6:], "--data", tiny_data,
            "--corruptions", "none", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"carddeck: interrupted: {out / 'checkpoint.pt'} holds the last finished epoch; rerun with --resume" in err
    assert not (out / "card.pt").exists()
    done = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and (out / "card.pt").exists(), done.stderr
    assert "resuming from round 0" in done.stderr


def test_the_long_steps_show_progress(tmp_path, tiny_data, capsys):
    """L-OBS's layer solves (minutes on CPU, silent before) and the corrupted-accuracy sweep (75 conditions by
    default, about a minute on digits32, silent before) show bars unless --no-progress. Mutant: either bar gone."""
    dense = compress(_config(tmp_path / "dense", tiny_data, method="dense", sparsity=0.0, epochs=1))
    argv = ["compress", *TINY[:4], "--epochs", "0", "--batch-size", "32", "--method", "lobs", "--sparsity", "0.5",
            "--init", str(dense.card), "--calib-images", "32", *FAST_EVAL]  # fmt: skip
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "shown")]) == 0
    err = capsys.readouterr().err
    assert "lobs layers" in err and "corrupted accuracy:   0%|          | 0/4 " in err, err  # 2 x 2 conditions
    assert main([*argv, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "lobs layers" not in err and "corrupted accuracy" not in err


def test_epochs_default_to_the_methods_own(tmp_path, tiny_data, capsys, caplog):
    """--epochs left out: 1 for the methods that prune a trained card (lobs, dsa, dipgo: the short retraining the
    README advises), 10 for those that train; an explicit --epochs wins, and --help says each default. Mutant: 10
    for every method (as before: a one-shot prune retrained 10 epochs at its fine-tune rate)."""
    dense = compress(_config(tmp_path / "dense", tiny_data, method="dense", sparsity=0.0, epochs=1))
    base = dict(arch="resnet20", data=tiny_data, batch_size=32, corruptions=(), progress=False)
    for method, sparsity, want in (("lobs", 0.5, 1), ("dsa", 0.5, 1), ("dipgo", 0.5, 1), ("lrr", 0.5, 10),
                                   ("filter", 0.5, 10), ("dense", 0.0, 10)):  # fmt: skip
        init = dense.card if method != "dense" else None
        config = CompressConfig(out=tmp_path / method, method=method, sparsity=sparsity, init=init, **base)
        assert plan(config).config.epochs == want, method
        assert plan(config).config.training_key()["epochs"] == want  # a --resume compares the number trained
    explicit = CompressConfig(out=tmp_path / "x", method="lobs", sparsity=0.5, init=dense.card, epochs=3, **base)
    assert plan(explicit).config.epochs == 3
    caplog.set_level(logging.INFO, "carddeck.compress.train")
    argv = ["compress", "--arch", "resnet20", "--batch-size", "32", "--no-progress", "--method", "lobs", "--sparsity",
            "0.5", "--init", str(dense.card), "--calib-images", "32", "--corruptions", "none"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0  # the command, not only the library, leaves it to lobs
    assert "round 1 epoch 1/1:" in caplog.text and "epoch 2/" not in caplog.text
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the method's, 1 for dipgo, dsa, lobs (" in text and "10 for biprop, dense, filter, lrr" in text


def test_a_filter_card_is_stored_with_its_batchnorm_statistics_re_estimated(tmp_path, tiny_data):
    """The pipeline hands the method training images, so the card's BatchNorm statistics are the pruned net's
    own even after one short epoch: from an --init card whose running variances are garbage (1e6), the filter
    card's are ordinary. Mutant: the pipeline leaves Method.bn_images unset (the statistics then are 0.9^3 of
    the garbage after 3 steps)."""
    from carddeck.compress.checkpoint import save_card

    dense = compress(_config(tmp_path / "dense", tiny_data, method="dense", sparsity=0.0, epochs=1))
    model, meta, raw = load_card(dense.card)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(1e6)
    garbled = save_card(tmp_path / "garbled", raw["arch"], raw["arch_kwargs"], model, meta)
    card = compress(_config(tmp_path / "filter", tiny_data, method="filter", sparsity=0.5, init=garbled, epochs=1))
    net, _, _ = load_card(card.card)
    variances = torch.cat([m.running_var for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert float(variances.max()) < 1e3, float(variances.max())
