import json

import numpy as np
import pytest

from carddeck.commands.cli import main
from carddeck.deck import Deck, DeckStore
from carddeck.gating import CalibratedRouter
from tests.cli_process import interrupt
from tests.deck.conftest import card

# The tiny cards record the dataset "synthetic"; their inputs are digits32-shaped.
FAST = ["--corruptions", "gaussian_noise,fog", "--severities", "1,5", "--data", "digits32"]


def tiny_deck(tmp_path):
    store = DeckStore.create(tmp_path / "deck")
    store.add_card(card("g1", "gaussian", seed=1))
    store.add_card(card("a1", "augmix", seed=2))
    return store


def test_calibrate_then_eval(tmp_path, capsys):
    store = tiny_deck(tmp_path)
    args = ["calibrate", "--deck", str(store.root), "--train-images", "48", "--val-images", "64", *FAST]
    assert main([*args, "--policy", "calibrated", "--store-calibration", "16"]) == 0
    assert "WARNING: deck" in capsys.readouterr().err  # trained on 'synthetic', calibrated on digits32: said loudly
    m = store.manifest()
    assert m.gate["policy"] == "calibrated" and set(m.gate["references"]) == {"gaussian", "augmix"}
    router = CalibratedRouter.load(store.root / m.gate["router"])
    assert router.card_keys == ("g1/1", "a1/1") and len(router.signatures) == 5 * 1  # 5 conditions x 64 images
    assert store.calibration_images().shape == (16, 32, 32, 3)
    deck = Deck.open(store.root)
    assert deck.default_policy == "calibrated"
    assert deck.predict(np.zeros((3, 32, 32, 3), np.uint8)).routing.policy == "calibrated"

    out = tmp_path / "report"
    assert main(["eval", "--deck", str(store.root), "--limit", "64", *FAST, "--out", str(out)]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["notes"]["router"] == "the deck's (carddeck calibrate)"
    assert data["conditions"] == ["clean/0", "gaussian_noise/1", "gaussian_noise/5", "fog/1", "fog/5"]
    methods = data["methods"]
    names = ("card:g1", "card:a1", "uniform", "nearest-domain", "calibrated", "calibrated/held-out", "soft/per-sample")
    for name in (*names, "oracle"):
        assert 0 <= methods[name]["mean_corrupted"] <= 1
    assert "| oracle |" in (out / "eval.md").read_text() and "verdict" in data["notes"]
    assert "mean corrupted" in capsys.readouterr().out


def test_stored_calibration_images_are_a_random_draw_of_a_class_sorted_split(tmp_path):
    """A training split stored class by class (leaves32's is) must still give calibration images of every
    class: the adaptive cards' reference statistics come from them. Kills taking the first N of the sorted
    index (the stored images were all of one class, and adaptation cost leaves32 6 points clean)."""
    from carddeck.data.datasets import load_dataset

    splits = {s: load_dataset("digits32", s) for s in ("train", "val", "test")}
    arrays = {}
    for s, ds in splits.items():
        order = np.argsort(ds.labels, kind="stable")
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = ds.images[order], ds.labels[order]
    np.savez(tmp_path / "sorted.npz", **arrays)
    store = tiny_deck(tmp_path)
    args = ["calibrate", "--deck", str(store.root), "--data", f"npz:{tmp_path / 'sorted.npz'}"]
    assert main([*args, "--no-signatures", "--no-router", "--store-calibration", "40"]) == 0
    stored = store.calibration_images()
    assert stored.shape == (40, 32, 32, 3)
    train = arrays["train_images"].reshape(len(arrays["train_images"]), -1)
    rows = [int(np.flatnonzero((train == im.reshape(1, -1)).all(axis=1))[0]) for im in stored]
    assert len(set(arrays["train_labels"][rows].tolist())) >= 8


def test_eval_fits_a_router_when_the_deck_has_none(tmp_path):
    store = tiny_deck(tmp_path)
    out = tmp_path / "r"
    args = ["eval", "--deck", str(store.root), "--limit", "32", "--val-images", "32", *FAST, "--no-per-sample"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["notes"]["router"].startswith("fitted on 32 val images")
    assert "calibrated" in data["methods"] and "calibrated/per-sample" not in data["methods"]
    assert "calibrated/held-out" in data["methods"]
    # selective prediction: a risk-coverage curve per combined method, the uniform deck's MSP the baseline
    sel = data["selective"]
    assert "uniform" in sel and "calibrated" in sel and not any(m.startswith("card:") for m in sel)
    assert sel["uniform"]["coverage"][-1] == 1.0 and 0 <= sel["uniform"]["aurc"] <= 1
    # at full coverage the error is the method's corrupted error (equal-sized conditions)
    assert sel["uniform"]["risk"][-1] == pytest.approx(1 - data["methods"]["uniform"]["mean_corrupted"])
    md = (out / "eval.md").read_text()
    assert "## Selective prediction" in md and "| uniform |" in md.split("## Selective prediction")[1]


def test_eval_can_shuffle_the_test_split_before_batching(tmp_path, capsys):
    """--order shuffled: batches mix every class (leaves32 stores its split class by class), said in the
    notes; a stored corrupted suite keeps its own order, so the two are refused together."""
    store = tiny_deck(tmp_path)
    args = ["eval", "--deck", str(store.root), "--limit", "32", *FAST, "--router", "none", "--no-held-out"]
    out = tmp_path / "r"
    assert main([*args, "--no-per-sample", "--order", "shuffled", "--out", str(out)]) == 0
    assert (
        json.loads((out / "eval.json").read_text())["notes"]["order"] == "test images shuffled (seed 0) before batching"
    )
    capsys.readouterr()
    assert main([*args, "--corrupted", str(tmp_path), "--order", "shuffled", "--out", str(out)]) == 2
    assert "--order shuffled needs --corrupted generate" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    store = tiny_deck(tmp_path)
    args = ["eval", "--deck", str(store.root), "--data", "digits32", "--corruptions", "nope"]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    assert "not available" in capsys.readouterr().err
    # no --data: the cards' own dataset, which no loader knows here
    assert main(["eval", "--deck", str(store.root), "--out", str(tmp_path / "x")]) == 2
    assert "unknown dataset 'synthetic'" in capsys.readouterr().err
    assert main(["eval", "--deck", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a deck" in capsys.readouterr().err
    empty = DeckStore.create(tmp_path / "empty")
    assert main(["calibrate", "--deck", str(empty.root)]) == 2
    assert "no cards" in capsys.readouterr().err


def test_eval_reads_a_stored_suite_written_by_carddeck_corrupt(tmp_path):
    store = tiny_deck(tmp_path)
    suite = tmp_path / "digits32-c"
    args = ["corrupt", "--data", "digits32", "--out", str(suite), "--corruptions", "fog,contrast"]
    assert main([*args, "--severities", "2,4"]) == 0
    out = tmp_path / "r"
    args = ["eval", "--deck", str(store.root), "--data", "digits32", "--corrupted", str(suite), "--limit", "48"]
    args += ["--router", "none"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["conditions"] == ["clean/0", "fog/2", "fog/4", "contrast/2", "contrast/4"]
    assert data["notes"]["corrupted"] == f"c:{suite}" and "calibrated" not in data["methods"]
    assert main([*args[:-2], "--severities", "5", "--out", str(out)]) == 2


@pytest.mark.parametrize(
    "flag, value, said",
    [
        ("--limit", "0", "argument --limit: expected a whole number >= 1, got '0'"),  # was a traceback
        ("--limit", "-5", "argument --limit: expected a whole number >= 1, got '-5'"),  # was [:-5]: nearly all
        ("--batch-size", "0", "argument --batch-size: expected a whole number >= 1"),  # was a traceback
        ("--val-images", "0", "argument --val-images: expected a whole number >= 1"),  # was a traceback
        ("--out", "FILE/report", "argument --out: FILE is a file, not a directory"),  # was said after the eval
    ],
)
def test_bad_numbers_and_an_out_under_a_file_are_named_before_any_work(tmp_path, capsys, flag, value, said):
    """Mutants: the plain int / str types these flags had (a traceback, a silently negative slice, or an --out
    found unusable only when the report is written, after the whole evaluation)."""
    store = tiny_deck(tmp_path)
    (tmp_path / "FILE").write_text("")
    value, said = value.replace("FILE", str(tmp_path / "FILE")), said.replace("FILE", str(tmp_path / "FILE"))
    args = ["eval", "--deck", str(store.root), *FAST, "--out", str(tmp_path / "r"), flag, value]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and said in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "bad, said",
    [
        (["--corruptions", "fogg"], "unknown corruption 'fogg'; valid choices: brightness"),
        (["--severities", "9"], "--severities must be among 1..5, got [9]"),
        (["--policy", "nearest"], "valid choices:"),  # was found only after the router's fit
    ],
)
def test_a_calibration_refused_for_a_bad_name_leaves_the_deck_as_it_was(tmp_path, capsys, bad, said):
    """Mutant: the names checked only where they are used (as before), after the domain signatures were
    already stored: the deck went up a version, half calibrated, on a run that ended in an error."""
    store = tiny_deck(tmp_path)
    before = store.manifest()
    args = ["calibrate", "--deck", str(store.root), "--train-images", "32", "--val-images", "32", "--data", "digits32"]
    assert main([*args, *bad]) == 2
    assert said in capsys.readouterr().err
    assert DeckStore(store.root).manifest() == before


def test_a_calibration_that_fails_at_its_last_write_leaves_the_deck_as_it_was(tmp_path, capsys):
    """A real failure at the boundary: the router's file cannot be written (a file named ``gate`` stands where its
    folder goes), after the references, calibration images and router were computed. The deck is as it was and
    still loads. Mutant: each part committed on its own (as before: the references and the calibration images
    landed, a version up each, and the router did not)."""
    store = tiny_deck(tmp_path)
    before = store.manifest()
    (store.root / "gate").write_text("in the way")
    args = ["calibrate", "--deck", str(store.root), "--train-images", "32", "--val-images", "32",
            "--store-calibration", "8", "--policy", "calibrated", *FAST]  # fmt: skip
    assert main(args) == 2
    assert f"File exists: '{store.root / 'gate'}'" in capsys.readouterr().err
    assert DeckStore(store.root).manifest() == before
    (store.root / "gate").unlink()
    deck = Deck.open(store.root)
    assert deck.version == before.version and deck.gate.router is None and deck.default_policy != "calibrated"
    assert DeckStore(store.root).calibration_images() is None
    assert main(args) == 0  # the same run, with room for its files: all of it lands, in one version
    after = DeckStore(store.root).manifest()
    assert after.version == before.version + 1 and after.gate["policy"] == "calibrated" and after.gate["router"]
    assert DeckStore(store.root).calibration_images().shape == (8, 32, 32, 3)


def test_ctrl_c_in_calibrate_says_the_deck_is_unchanged_and_leaves_it_so(tmp_path):
    """A real SIGINT while the router's runs are collected (after the references were computed): exit 130, one
    line saying nothing was written, the deck as it was. Mutants: the interrupt silent (as before), or the
    references committed before the router's fit (as before: the deck a version up, half calibrated)."""
    store = tiny_deck(tmp_path)
    before = store.manifest()
    code, err = interrupt(["calibrate", "--deck", str(store.root), "--data", "digits32", "--store-calibration", "8"],
                          "calibrate:", tmp_path / "err.txt")  # fmt: skip
    assert code == 130 and "Traceback" not in err, err
    assert f"carddeck: interrupted: calibrate of {store.root}: nothing was written: the deck is as it was " \
           f"(version {before.version})" in err  # fmt: skip
    assert DeckStore(store.root).manifest() == before
    assert Deck.open(store.root).version == before.version


def test_ctrl_c_in_eval_says_no_report_was_written(tmp_path):
    """A real SIGINT while the test conditions run: exit 130 and one line naming the deck and that nothing was
    written to --out. Mutant: the interrupt silent (as before)."""
    store, out = tiny_deck(tmp_path), tmp_path / "report"
    code, err = interrupt(["eval", "--deck", str(store.root), "--data", "digits32", "--out", str(out)], "eval (test)",
                          tmp_path / "err.txt")  # fmt: skip
    assert code == 130 and "Traceback" not in err, err
    assert f"carddeck: interrupted: eval of {store.root} before its report: nothing was written to {out}" in err
    assert not out.exists() or not list(out.iterdir())


def test_max_cards_below_one_is_named_before_any_work(tmp_path, capsys):
    """Mutant: --max-cards an int of any value (as before: 0 ran every condition, then the router's fit died in
    numpy, 'need at least one array to stack', with a traceback)."""
    store = tiny_deck(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--deck", str(store.root), "--max-cards", "0"])
    assert exc.value.code == 2 and "--max-cards: expected a whole number >= 1, got '0'" in capsys.readouterr().err
