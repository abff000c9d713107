"""Taking out of a stream the usage chunk that the middleware, not the client, asked for.

With ``stream_usage=True`` the middlewares ask OpenAI-compatible servers to end a stream with a chunk that
carries the usage and no choices (``stream_options.include_usage``), to settle its reservation exactly. A
client that did not ask for that chunk gets its stream without it: ``UsageChunkFilter`` passes every event
on as soon as it is complete, the bytes as they came, except an event whose data is a usage chunk without
choices (``{"choices": [], "usage": {...}}``); a chunk that has choices stays whole. It holds back only the
start of an event not complete yet (events end with a blank line, of LF, CRLF or CR line ends), and no more
than ``_MAX_HELD`` bytes of one: an event that long is no usage chunk, and passes on as it comes. The meter
reads the stream as the server sent it, the usage chunk included.
"""

from __future__ import annotations

import re

from .tokens import event_payload, is_event_stream

__all__ = ["UsageChunkFilter"]

_EOL = rb"(?:\r\n|\n|\r(?=[^\n]))"  # a CR that ends a chunk may be the first half of a CRLF
_EVENT_END = re.compile(_EOL + _EOL)
_LAST_EVENT_END = re.compile(rb"(?:\r\n|\n|\r){2}\Z")  # at the body's end, a CR ends a line
_LONGEST_END = 3  # bytes of an event end (at most 4) that may have been searched already, with no match
_CR = re.compile(rb"\r\n?")
_BOM = b"\xef\xbb\xbf"
_MAX_HELD = 64 * 1024
"""Bytes held back of an event not complete yet. A usage chunk is a few hundred; a longer event (a large
delta) goes on as it comes, so that a stream is never held."""


def _usage_only(event: bytes | bytearray) -> bool:
    """Whether ``event`` is a usage chunk without choices."""
    if b'"usage"' not in event:  # most events: no need to parse them
        return False
    payload = event_payload(_CR.sub(b"\n", event.removeprefix(_BOM)))
    return (
        isinstance(payload, dict) and payload.get("choices") == [] and isinstance(payload.get("usage"), dict)
    )


class UsageChunkFilter:
    """The body of one streamed response, less its usage chunks without choices (see the module)."""

    __slots__ = ("_held", "_passing", "_scanned")

    def __init__(self) -> None:
        self._held = bytearray()  # what was not passed on yet: the start of an event not complete yet
        self._scanned = 0  # bytes of _held searched for an event end, with no match
        self._passing = False  # the held event grew past _MAX_HELD: it passes on as it comes, to its end

    @staticmethod
    def applies(content_type: str, content_length: str, content_encoding: str) -> bool:
        """Whether a response's body can go through the filter: a stream of server-sent events, neither of a
        set length (which the filter would make wrong) nor compressed (whose events it cannot see)."""
        return (
            is_event_stream(content_type)
            and not content_length
            and content_encoding.strip().lower() in ("", "identity")
        )

    def pass_on(self, chunk: bytes) -> bytes:
        """What of the body's next chunk, and of what was held before it, goes to the client now."""
        held = self._held
        held += chunk
        passed: list[bytes | bytearray] = []
        start = 0
        search = max(0, self._scanned - _LONGEST_END)
        while (found := _EVENT_END.search(held, search)) is not None:
            end = found.end()
            if self._passing or not _usage_only(held[start:end]):
                passed.append(held[start:end])
            self._passing = False
            start = search = end
        del held[:start]
        if len(held) > _MAX_HELD:
            self._passing = True
        if self._passing:  # all but what may begin the event's end
            passed.append(held[:-_LONGEST_END])
            del held[:-_LONGEST_END]
        self._scanned = len(held)
        return b"".join(passed)

    def rest(self) -> bytes:
        """At the end of the body: what was held, as it came (an event the stream did not complete), but for
        a usage chunk that a CR, which ``pass_on`` could not tell from half a CRLF, ended last."""
        rest = bytes(self._held)
        self._held.clear()
        self._scanned = 0
        if not self._passing and _LAST_EVENT_END.search(rest) and _usage_only(rest):
            return b""
        return rest
