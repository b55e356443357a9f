"""One upload path for AddCard's chunks and RepositoryModelLoad's file (gRPC and HTTP)."""

import hashlib

import pytest

from carddeck.errors import InvalidInput, TooLarge
from carddeck.serving.uploads import CardUpload, MiB


def test_chunks_join_and_the_digest_sent_with_any_chunk_is_checked():
    data = bytes(range(256)) * 10
    upload = CardUpload(MiB)
    upload.add(data[:1000], hashlib.sha256(data).hexdigest().upper())  # clients may send it upper-case
    upload.add(data[1000:])
    assert upload.finish() == data


def test_a_wrong_digest_names_both():
    upload = CardUpload(MiB)
    upload.add(b"card", "0" * 64)
    with pytest.raises(InvalidInput, match=r"sha256: the upload's digest [0-9a-f]{64} does not match '0{64}'"):
        upload.finish()


def test_past_the_limit_is_refused_at_the_chunk_that_crosses_it():
    upload = CardUpload(2 * MiB)
    upload.add(bytes(MiB))
    upload.add(bytes(MiB))
    with pytest.raises(TooLarge, match=r"limit of 2 MiB \(max_card_mb\)"):
        upload.add(b"x")


def test_an_empty_upload_names_its_field():
    with pytest.raises(InvalidInput, match=r"parameters\['file:model.onnx'\]: empty upload"):
        CardUpload(MiB, field="parameters['file:model.onnx']").finish()
