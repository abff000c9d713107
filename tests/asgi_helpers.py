"""Driving a raw ASGI app by hand, to see exactly which messages cross the middleware."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from ratelimit_middleware.asgi import ASGIApp, Message


def http_scope(
    path: str = "/v1/chat/completions",
    method: str = "POST",
    headers: Iterable[tuple[str, str]] = (),
    client: tuple[str, int] | None = ("203.0.113.7", 50000),
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers],
        "client": client,
        "server": ("testserver", 80),
    }


async def call(app: ASGIApp, scope: dict[str, Any], chunks: Iterable[bytes] = (b"",)) -> list[Message]:
    """Run one request; the body arrives as ``chunks`` (one http.request message each)."""
    pending = list(chunks)
    incoming: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": index < len(pending) - 1}
        for index, chunk in enumerate(pending)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # like a server: no disconnect while the client is still there
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def status_of(sent: list[Message]) -> int:
    starts = [message for message in sent if message["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    return int(starts[0]["status"])


def headers_of(sent: list[Message]) -> dict[str, str]:
    start = next(message for message in sent if message["type"] == "http.response.start")
    return {name.decode(): value.decode() for name, value in start["headers"]}


def body_of(sent: list[Message]) -> bytes:
    return b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
