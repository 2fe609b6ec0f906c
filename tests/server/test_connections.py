"""Connections a hostile client opens: idle ones, slow headers and slow bodies are closed
after their timeouts, connections beyond the bound are closed at once; a request the server
rejects (a lone surrogate, an internal error) leaves its keep-alive connection usable."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import LiveServer, start_server

TIMEOUT = 0.5  # keep-alive, header and body timeouts of the server below


@pytest.fixture(scope="module")
def guarded(model_dir: Path) -> Iterator[LiveServer]:
    live = start_server(
        model_dir,
        keep_alive_timeout=TIMEOUT,
        header_timeout=TIMEOUT * 2,
        body_timeout=TIMEOUT,
        limit_concurrency=6,
    )
    yield live
    live.stop()


def connect(live: LiveServer) -> socket.socket:
    host, port = live.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def closed_after(sock: socket.socket, limit: float = 5.0) -> tuple[float, bytes]:
    """Read until the server closes; (seconds it took, bytes received)."""
    started, data = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"still open after {limit} s; got {data[:200]!r}") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - started, data


def test_idle_connection_is_closed_after_the_keep_alive_timeout(guarded: LiveServer) -> None:
    with connect(guarded) as sock:
        took, data = closed_after(sock)
    assert data == b"" and TIMEOUT * 0.8 < took < TIMEOUT + 2


def test_slow_headers_are_cut_off(guarded: LiveServer) -> None:
    """A header line every 0.2 s keeps the connection busy but never finishes the headers."""
    started = time.monotonic()
    with connect(guarded) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for i in range(40):
                time.sleep(0.2)
                sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            pass
        closed_after(sock)
    assert time.monotonic() - started < TIMEOUT * 2 + 2


def test_slow_body_gets_408_and_is_closed(guarded: LiveServer) -> None:
    with connect(guarded) as sock:
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"prompt": "')
        took, data = closed_after(sock)
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    error = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "RequestTimeoutError" and error["code"] == 408
    assert took < TIMEOUT + 2


def test_connections_beyond_the_bound_are_closed_at_once(guarded: LiveServer) -> None:
    """Six connections are held (idle); the seventh is closed at once instead of holding a
    file descriptor; once the idle ones time out, requests are served again."""
    held = [connect(guarded) for _ in range(6)]
    try:
        time.sleep(0.1)
        with connect(guarded) as extra:
            took, data = closed_after(extra, limit=TIMEOUT * 0.8)
        assert data == b""
    finally:
        for sock in held:
            sock.close()
    with guarded.client() as http:
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def keep_alive_pair(live: LiveServer, first: tuple[str, bytes], second: tuple[str, dict]):
    """Send two requests on one connection; (first response, its body, second response)."""
    host, port = live.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json"}
    try:
        conn.request("POST", first[0], body=first[1], headers=headers)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        sock = conn.sock
        assert sock is not None and not resp.will_close, "the server closed the connection"
        conn.request("POST", second[0], body=json.dumps(second[1]), headers=headers)
        again = conn.getresponse()
        again.read()
        assert conn.sock is sock
        return resp, body, again
    finally:
        conn.close()


SURROGATES = [
    ("/v1/completions", b'{"prompt": "caf\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": "Hi", "stop": ["\\ud83d"]}', "stop"),
    ("/v1/completions", b'{"prompt": "Hi", "model": "tiny\\ud800"}', "model"),
    ("/v1/completions", b'{"prompt": "Hi", "user": "\\ud800"}', "user"),
    ("/v1/completions", b'{"prompt": "Hi", "\\ud800": 1}', "\ud800"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udc00"}]}]}',
        "messages",
    ),
]


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATES, ids=lambda x: str(x)[:30])
def test_lone_surrogate_is_400_and_the_connection_serves_the_next_request(
    guarded: LiveServer, path: str, raw: bytes, param: str
) -> None:
    """Half an emoji from a JavaScript client: 400 naming the field, then the same
    keep-alive connection serves a normal request."""
    resp, body, again = keep_alive_pair(
        guarded, (path, raw), ("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    )
    assert resp.status == 400 and body["error"]["type"] == "BadRequestError"
    assert body["error"]["param"] == param.encode("utf-8", "backslashreplace").decode()
    assert "surrogate" in body["error"]["message"]
    assert again.status == 200
    with guarded.client() as http:  # a proper pair (an emoji) is fine
        emoji = b'{"prompt": "fun \\ud83d\\ude00", "max_tokens": 2}'
        assert http.post("/v1/completions", content=emoji).status_code == 200


def test_internal_error_hides_its_text_and_keeps_the_connection(
    guarded: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception while preparing a request: 500 with a reference to the log
    (which has the traceback), no exception text, and the connection still serves."""
    tokenizer = guarded.engine.tokenizer

    def broken_encode(*args, **kwargs):
        raise ValueError("secret internal detail /home/model/path")

    monkeypatch.setattr(tokenizer, "encode", broken_encode)
    caplog.set_level(logging.ERROR, logger="runtime.server")
    body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    resp, err, again = keep_alive_pair(
        guarded, ("/v1/completions", body), ("/v1/completions", {"prompt": [1, 2], "max_tokens": 2})
    )
    assert resp.status == 500 and err["error"]["type"] == "InternalServerError"
    message = err["error"]["message"]
    assert "secret" not in message and "ValueError" not in message
    reference = message.split("(reference ", 1)[1].split(")", 1)[0]
    assert f"internal error {reference}" in caplog.text and "secret internal detail" in caplog.text
    assert again.status == 200


def test_open_files_limit_fits_the_connection_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 256-descriptor soft limit is raised to fit; where the hard limit forbids it, the
    connection bound shrinks to fit instead of ending in EMFILE on every accept."""
    import resource

    from runtime.server.http import RESERVED_FILES, fit_open_files

    limits = {"now": (256, 4096)}
    monkeypatch.setattr(resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: limits.update(now=value))
    assert fit_open_files(512) == 512 and limits["now"] == (512 + RESERVED_FILES, 4096)
    limits["now"] = (256, 256)
    assert fit_open_files(512) == 256 - RESERVED_FILES
