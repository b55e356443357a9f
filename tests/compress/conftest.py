import numpy as np
import pytest
import torch

from carddeck.data.datasets import load_dataset

torch.set_num_threads(1)  # tiny nets on a shared box: one thread is fastest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 96/48-image slice of digits32 as an npz dataset spec, so a training epoch takes a second."""
    d = load_dataset("digits32", "train")
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(
        path,
        train_images=d.images[:96],
        train_labels=d.labels[:96],
        val_images=d.images[96:144],
        val_labels=d.labels[96:144],
        test_images=d.images[144:150],
        test_labels=d.labels[144:150],
    )
    return f"npz:{path}"


@pytest.fixture(scope="session")
def trained_dense(tmp_path_factory):
    """A half-width resnet20 trained 6 epochs on all of digits32 (about 95% clean): a card worth pruning.

    About a minute and a half on a loaded 2-core box: for ``slow`` tests only."""
    from carddeck.compress import CompressConfig, compress

    out = tmp_path_factory.mktemp("trained") / "dense"
    config = CompressConfig(arch="resnet20", out=out, width=0.5, epochs=6, batch_size=64, corruptions=(),
                            progress=False)  # fmt: skip
    return compress(config)
