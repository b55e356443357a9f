"""A card upload, whatever carries it: AddCard's streamed chunks, RepositoryModelLoad's file parameter
(gRPC or HTTP). The bytes are joined in memory (no temporary file a crash could leave behind or a
message could name), refused as soon as they pass the server's card limit, and checked against the
sha256 the client sent, when it sent one.
"""

from __future__ import annotations

import hashlib

from carddeck.errors import InvalidInput, TooLarge, shown

MiB = 1 << 20


class CardUpload:
    def __init__(self, limit_bytes: int, *, field: str = "data") -> None:
        self.limit_bytes = limit_bytes
        self.field = field  # where the bytes came from, for messages
        self.sha256 = ""
        self._buf = bytearray()

    def add(self, data: bytes, sha256: str = "") -> None:
        """One more piece (and the digest of the whole, when this piece carries it); TooLarge past the limit."""
        if len(self._buf) + len(data) > self.limit_bytes:
            raise TooLarge(f"card upload exceeds the server's limit of {self.limit_bytes // MiB} MiB (max_card_mb)")
        self._buf += data
        if sha256:
            self.sha256 = sha256

    def finish(self) -> bytes:
        """The whole card; InvalidInput when it is empty or its digest is not the one sent."""
        if not self._buf:
            raise InvalidInput(f"{self.field}: empty upload; send the card's ONNX file")
        data = bytes(self._buf)
        self._buf = bytearray()  # one copy of the card at a time
        if self.sha256:
            digest = hashlib.sha256(data).hexdigest()
            if digest != self.sha256.lower():
                raise InvalidInput(f"sha256: the upload's digest {digest} does not match {shown(self.sha256)}")
        return data


__all__ = ["CardUpload", "MiB"]
