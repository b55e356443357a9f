"""``carddeck corrupt`` writes a suite that load_corrupted reads back."""

import numpy as np
import pytest

from carddeck.commands.cli import main
from carddeck.commands.corrupt import chunk_seed
from carddeck.data import load_dataset
from carddeck.data.corrupted import load_corrupted
from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt
from carddeck.errors import InvalidInput


def test_corrupt_round_trips_through_load_corrupted(tmp_path, capsys):
    out = tmp_path / "digits32-c"
    rc = main(["corrupt", "--data", "digits32", "--split", "test", "--out", str(out),
               "--corruptions", "fog,gaussian_noise", "--severities", "3,1"])  # fmt: skip
    assert rc == 0
    assert "2 corruptions x 2 severities x 360 images" in capsys.readouterr().out
    test = load_dataset("digits32", "test")
    suite = load_corrupted(f"c:{out}")
    assert suite.corruptions == ("gaussian_noise", "fog") and suite.severities == (1, 3)
    assert suite.class_names == test.class_names
    for name in ("fog", "gaussian_noise"):
        for s in (1, 3):
            d = suite.get(name, s)
            assert np.array_equal(d.images, corrupt(test.images, name, s, seed=0)), (name, s)
            assert np.array_equal(d.labels, test.labels)
    raw = np.load(out / "fog.npy")
    assert raw.shape == (720, 32, 32, 3) and raw.dtype == np.uint8  # the CIFAR-10-C layout
    assert np.load(out / "labels.npy").dtype == np.uint8
    assert sorted(p.name for p in out.iterdir()) == ["carddeck-c.json", "fog.npy", "gaussian_noise.npy", "labels.npy"]


def test_chunks_use_derived_seeds_and_seed_changes_the_noise(tmp_path):
    out = tmp_path / "chunked"
    assert main(["corrupt", "--data", "digits32", "--out", str(out), "--corruptions", "shot_noise",
                 "--severities", "2", "--chunk", "100", "--seed", "5"]) == 0  # fmt: skip
    images = load_dataset("digits32", "test").images
    got = load_corrupted(f"c:{out}").get("shot_noise", 2).images
    assert np.array_equal(got[:100], corrupt(images[:100], "shot_noise", 2, seed=5))
    assert np.array_equal(got[300:], corrupt(images[300:], "shot_noise", 2, seed=chunk_seed(5, 3)))
    assert not np.array_equal(got[:100], corrupt(images[:100], "shot_noise", 2, seed=0))


def test_all_19_corruptions_at_severity_5_on_a_small_npz(tmp_path):
    src = tmp_path / "small.npz"
    images = load_dataset("digits32", "test").images[:24]
    labels = load_dataset("digits32", "test").labels[:24]
    np.savez(src, train_images=images[:1], train_labels=labels[:1], val_images=images[:1], val_labels=labels[:1],
             test_images=images, test_labels=labels)  # fmt: skip
    out = tmp_path / "small-c"
    assert main(["corrupt", "--data", f"npz:{src}", "--out", str(out), "--severities", "5"]) == 0
    suite = load_corrupted(f"c:{out}")
    assert suite.corruptions == BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS and suite.severities == (5,)
    for name in suite.corruptions:
        d = suite.get(name, 5)
        assert d.images.shape == (24, 32, 32, 3) and not np.array_equal(d.images, images), name


def test_bad_arguments_exit_2_with_the_valid_choices(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["corrupt", "--data", "digits32", "--out", str(out), "--corruptions", "fog,rain"]) == 2
    assert "unknown corruption 'rain'; valid choices:" in capsys.readouterr().err
    assert main(["corrupt", "--data", "digits32", "--out", str(out), "--severities", "1,7"]) == 2
    assert "valid severities: 1, 2, 3, 4, 5" in capsys.readouterr().err
    assert main(["corrupt", "--data", "mnist", "--out", str(out)]) == 2
    assert "unknown dataset 'mnist'" in capsys.readouterr().err
    assert not out.exists()


def test_rewriting_replaces_files_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "again"
    for seed in ("0", "1"):
        assert main(["corrupt", "--data", "digits32", "--out", str(out), "--corruptions", "impulse_noise",
                     "--severities", "1", "--seed", seed]) == 0  # fmt: skip
    images = load_dataset("digits32", "test").images
    assert np.array_equal(load_corrupted(f"c:{out}").get("impulse_noise", 1).images,
                          corrupt(images, "impulse_noise", 1, seed=1))  # fmt: skip
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_smaller_suite_written_over_a_larger_one_reads_as_itself(tmp_path):
    """A rerun into the same --out with fewer corruptions and severities (after an interrupted or earlier run)
    leaves the earlier files beside the new ones: the suite is what its carddeck-c.json names. Mutant: every
    .npy file read as part of the suite (before: refused, 720 images against 360 labels)."""
    out = tmp_path / "again"
    assert main(["corrupt", "--data", "digits32", "--out", str(out), "--corruptions", "fog,impulse_noise",
                 "--severities", "1,2"]) == 0  # fmt: skip
    assert main(["corrupt", "--data", "digits32", "--out", str(out), "--corruptions", "fog", "--severities", "3"]) == 0
    suite = load_corrupted(f"c:{out}")
    assert suite.corruptions == ("fog",) and suite.severities == (3,)
    images = load_dataset("digits32", "test").images
    assert np.array_equal(suite.get("fog", 3).images, corrupt(images, "fog", 3, seed=0))
    (out / "fog.npy").unlink()
    with pytest.raises(InvalidInput, match="names fog, but .* has no such file"):
        load_corrupted(f"c:{out}")


def test_ctrl_c_says_what_is_kept_and_an_interrupted_rewrite_is_no_suite(tmp_path):
    """A real SIGINT to a rewrite of a suite (other seed) once its first file is written: exit 130, one line saying
    the finished files stay and the suite's labels and JSON are not there; the earlier suite's are gone, so the mix
    of old and new arrays does not read as a suite. Mutants: the interrupt silent, or the old JSON and labels kept
    (as before: the interrupted rerun read as the earlier suite, gaussian_noise already the new seed's)."""
    from carddeck.data.corrupted import SUITE_META
    from tests.cli_process import interrupt

    out = tmp_path / "suite"
    assert main(["corrupt", "--data", "digits32", "--out", str(out), "--corruptions", "benchmark",
                 "--severities", "1"]) == 0  # fmt: skip
    first = (out / "gaussian_noise.npy").stat().st_mtime_ns
    # once shot_noise starts, gaussian_noise.npy is the new seed's
    code, err = interrupt(["corrupt", "--data", "digits32", "--out", str(out), "--seed", "5"], "shot_noise]",
                          tmp_path / "err.txt")  # fmt: skip
    assert code == 130 and "Traceback" not in err, err
    assert f"carddeck: interrupted: corrupt into {out}: the corruption files finished so far are kept, but " \
           f"labels.npy and {SUITE_META} (written last) are not there" in err  # fmt: skip
    assert (out / "gaussian_noise.npy").stat().st_mtime_ns > first  # rewritten: old and new arrays side by side
    assert not (out / SUITE_META).exists()
    with pytest.raises(InvalidInput, match="labels.npy: file not found"):
        load_corrupted(f"c:{out}")
