"""The CIFAR-10-C .npy layout reader."""

import numpy as np
import pytest

from carddeck.data.corrupted import CIFAR100_CLASSES, load_corrupted
from carddeck.errors import InvalidInput

N = 6  # images per severity


def _write_suite(root, corruptions=("gaussian_noise", "fog"), n=N, severities=5, shape=(32, 32, 3)):
    """A suite exactly like the release: <corruption>.npy uint8 (5n, H, W, 3), labels.npy uint8 (5n,)."""
    root.mkdir(exist_ok=True)
    for k, name in enumerate(corruptions):
        blocks = [np.full((n, *shape), 10 * k + s, np.uint8) for s in range(1, severities + 1)]  # value = severity
        np.save(root / f"{name}.npy", np.concatenate(blocks))
    np.save(root / "labels.npy", np.tile(np.arange(n, dtype=np.uint8) % 10, severities))
    return root


def test_cifar10c_blocks_are_read_by_severity(tmp_path):
    root = _write_suite(tmp_path / "CIFAR-10-C")
    np.save(root / "notes.npy", np.zeros(3))  # not a corruption: ignored
    suite = load_corrupted(f"cifar10c:{root}")
    assert suite.corruptions == ("gaussian_noise", "fog") and suite.severities == (1, 2, 3, 4, 5)
    assert suite.benchmark_corruptions == ("gaussian_noise", "fog")
    assert suite.class_names[0] == "airplane" and suite.images_per_severity == N
    for s in (1, 3, 5):
        d = suite.get("fog", s)
        assert d.images.shape == (N, 32, 32, 3) and np.all(d.images == 10 + s)
        assert list(d.labels) == list(np.arange(N) % 10) and d.labels.dtype == np.int64
    assert len(list(suite)) == 10


def test_cifar100c_has_the_100_fine_class_names(tmp_path):
    suite = load_corrupted(f"cifar100c:{_write_suite(tmp_path / 'c100')}")
    assert len(suite.class_names) == 100 and suite.class_names == CIFAR100_CLASSES
    assert suite.class_names[:3] == ("apple", "aquarium_fish", "baby")


def test_unknown_corruptions_severities_and_suites_are_named(tmp_path):
    suite = load_corrupted(f"cifar10c:{_write_suite(tmp_path / 's')}")
    with pytest.raises(InvalidInput, match="no corruption 'snow'; present: gaussian_noise, fog"):
        suite.get("snow", 1)
    with pytest.raises(InvalidInput, match="no severity 6; present: 1, 2, 3, 4, 5"):
        suite.get("fog", 6)
    with pytest.raises(
        InvalidInput, match="unknown corrupted suite 'imagenetc'; valid choices: c, cifar100c, cifar10c"
    ):
        load_corrupted(f"imagenetc:{tmp_path}")
    with pytest.raises(InvalidInput, match="needs a directory"):
        load_corrupted("cifar10c")


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda r: (r / "labels.npy").unlink(), "labels.npy: file not found"),
        (lambda r: np.save(r / "fog.npy", np.zeros((5 * N, 32, 32, 3), np.float32)), r"fog.npy: expected uint8"),
        (
            lambda r: np.save(r / "fog.npy", np.zeros((5 * N, 32, 32), np.uint8)),
            r"fog.npy: expected uint8 \[N, H, W, 3\]",
        ),
        (
            lambda r: np.save(r / "fog.npy", np.zeros((4 * N, 32, 32, 3), np.uint8)),
            "fog.npy: 24 images but labels.npy has 30",
        ),
        (
            lambda r: np.save(r / "fog.npy", np.zeros((5 * N, 16, 16, 3), np.uint8)),
            r"fog.npy: images are \[16, 16, 3\]",
        ),
        (lambda r: np.save(r / "labels.npy", np.zeros(29, np.uint8)), "labels.npy: 29 labels do not split into 5"),
        (lambda r: np.save(r / "labels.npy", np.zeros(30, np.float32)), "labels.npy: expected a 1-D integer array"),
        (lambda r: np.save(r / "labels.npy", np.full(30, 10, np.uint8)), r"labels must lie in 0..9"),
        (lambda r: (r / "fog.npy").write_bytes(b"\x93NUMPY garbage"), "fog.npy: not a readable .npy"),
        (lambda r: [(r / f"{c}.npy").unlink() for c in ("fog", "gaussian_noise")], "no corruption files; expected"),
    ],
)
def test_malformed_suites_are_rejected_naming_the_file(tmp_path, break_it, message):
    root = _write_suite(tmp_path / "bad")
    break_it(root)
    with pytest.raises(InvalidInput, match=message):
        load_corrupted(f"cifar10c:{root}")


def test_missing_directory(tmp_path):
    with pytest.raises(InvalidInput, match="not a directory"):
        load_corrupted(f"cifar10c:{tmp_path / 'nope'}")
