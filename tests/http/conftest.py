"""Real ``carddeck serve`` processes with HTTP on a free loopback port, and a plain HTTP helper."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ADMIN_TOKEN, ServerProcess, make_deck, start_server


@dataclass
class HttpServer:
    process: ServerProcess
    port: int

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        doc = self.json()
        assert set(doc) == {"error"}, doc
        return str(doc["error"])


def http_server(
    deck: Path, tmp: Path, *args: str, env: dict[str, str] | None = None, preexec_fn: Any = None
) -> HttpServer:
    process = start_server(deck, tmp, *args, env=env, preexec_fn=preexec_fn)
    match = re.search(r"HTTP \(Open Inference Protocol, /v2\) on \S+:(\d+)", process.log())
    assert match, process.log()[-2000:]
    return HttpServer(process, int(match.group(1)))


def request(
    server: HttpServer, method: str, path: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None
) -> Answer:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """One server for the module: admin token, 1 MiB message limit, 1 MiB cards, at most 64 images."""
    tmp = tmp_path_factory.mktemp("http")
    srv = http_server(
        make_deck(tmp / "deck"), tmp, "--poll-interval-s", "0.2", "--max-request-images", "64",
        "--max-message-mb", "1", "--max-card-mb", "1", env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    yield srv
    srv.process.terminate()
