"""Token arithmetic for LLM requests: estimate before the call, read the real usage after it.

``estimate(body)`` reads an OpenAI- or Anthropic-style JSON request: the prompt (``messages``, ``prompt``,
``input``, ``system``) at about four characters per token, or exactly with ``tiktoken`` when it is installed,
plus the output cap (``max_tokens``, ``max_completion_tokens`` or ``max_output_tokens``, else
``default_output_tokens``), times ``n`` completions.

``UsageReader`` watches a response go by without holding it: a JSON body (OpenAI ``usage.prompt_tokens`` /
``completion_tokens``, the Responses API's and Anthropic's ``input_tokens`` / ``output_tokens``) or a
server-sent event stream (the final chunk's ``usage``; Anthropic's ``message_start`` and ``message_delta``
events). It keeps at most ``max_json_size`` bytes of a JSON body and one event at a time of a stream, and
counts the streamed text so that a stream cut short can still be charged for what was produced.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from .config import check_amount

__all__ = ["DEFAULT_OUTPUT_TOKENS", "Meter", "UsageReader", "count_text_tokens", "estimate", "token_pair"]

DEFAULT_OUTPUT_TOKENS = 1024
"""The output estimate when a request sets no output cap."""

_CAP_FIELDS = ("max_completion_tokens", "max_output_tokens", "max_tokens")
_MAX_EVENT_SIZE = 1024 * 1024


def _tiktoken_counter() -> Callable[[str], int] | None:
    try:
        tiktoken = importlib.import_module("tiktoken")  # optional: more exact counts when installed
        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception:  # not installed, or its encoding file cannot be had offline
        return None
    return lambda text: len(encoding.encode(text, disallowed_special=()))


_TIKTOKEN = _tiktoken_counter()


def count_text_tokens(text: str) -> int:
    """Tokens in ``text``: exact with tiktoken installed, else about one per four characters."""
    if _TIKTOKEN is not None:
        return _TIKTOKEN(text)
    return (len(text) + 3) // 4


def _texts(value: object) -> Iterable[str]:
    """Every string inside a prompt structure (messages, content parts, plain strings)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for key in ("content", "text", "input", "prompt", "system"):
            if key in value:
                yield from _texts(value[key])


def _whole(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def token_pair(value: object, source: str) -> tuple[int, int]:
    """``value`` if it is ``(input_tokens, output_tokens)``, two ints >= 0, as a user's function must
    answer; else a ``TypeError`` naming ``source`` (``"the estimator"``) and the value."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        try:
            return check_amount(value[0], "input_tokens"), check_amount(value[1], "output_tokens")
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{source} must return (input_tokens, output_tokens), two ints >= 0, got {value!r}")


def estimate(body: object, default_output_tokens: int = DEFAULT_OUTPUT_TOKENS) -> tuple[int, int]:
    """``(input_tokens, output_tokens)`` expected for a request body; ``(0, default)`` when it is not JSON."""
    if not isinstance(body, dict):
        return 0, default_output_tokens
    text = "".join(
        piece
        for key in ("system", "messages", "prompt", "input")
        if key in body
        for piece in _texts(body[key])
    )
    prompt = count_text_tokens(text) if text else 0
    cap = next(
        (_whole(body.get(field)) for field in _CAP_FIELDS if _whole(body.get(field)) is not None), None
    )
    completions = _whole(body.get("n")) or 1
    return prompt, (default_output_tokens if cap is None else cap) * completions


def _usage(payload: Any) -> tuple[int | None, int | None]:
    """``(input, output)`` from a JSON object's usage, in any of the shapes the providers send."""
    if not isinstance(payload, dict):
        return None, None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        message = payload.get("message")  # Anthropic's message_start event
        usage = message.get("usage") if isinstance(message, dict) else None
    if not isinstance(usage, dict):
        return None, None
    input_tokens = _whole(usage.get("prompt_tokens", usage.get("input_tokens")))
    output_tokens = _whole(usage.get("completion_tokens", usage.get("output_tokens")))
    return input_tokens, output_tokens


def _streamed_text(payload: Any) -> str:
    """The text a stream chunk carries (OpenAI deltas, Anthropic content deltas)."""
    if not isinstance(payload, dict):
        return ""
    pieces = []
    choices = payload.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                pieces.append(delta["content"])
    delta = payload.get("delta")
    if isinstance(delta, dict) and isinstance(delta.get("text"), str):
        pieces.append(delta["text"])
    return "".join(pieces)


class UsageReader:
    """Reads token usage from a response as its body chunks go by (it never changes or holds them)."""

    __slots__ = ("_buffer", "_input", "_max_json_size", "_output", "_overflow", "_stream", "_streamed")

    def __init__(self, content_type: str, max_json_size: int = _MAX_EVENT_SIZE) -> None:
        self._stream = content_type.split(";")[0].strip().lower() == "text/event-stream"
        self._max_json_size = max_json_size
        self._buffer = bytearray()
        self._overflow = False
        self._input: int | None = None
        self._output: int | None = None
        self._streamed = 0

    def feed(self, chunk: bytes) -> None:
        """Look at the next body chunk."""
        if self._overflow or not chunk:
            return
        self._buffer += chunk
        if self._stream:
            self._read_events()
        if len(self._buffer) > self._max_json_size:  # a JSON body too large, or one event too long
            self._overflow = True
            self._buffer.clear()

    def _read_events(self) -> None:
        while True:
            buffer = self._buffer.replace(b"\r\n", b"\n")
            end = buffer.find(b"\n\n")
            if end < 0:
                self._buffer = buffer
                return
            event, self._buffer = buffer[:end], bytearray(buffer[end + 2 :])
            data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
            if data and data != b"[DONE]":
                self._take(data, streaming=True)

    def _take(self, data: bytes | bytearray, streaming: bool) -> None:
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):
            return
        input_tokens, output_tokens = _usage(payload)
        if input_tokens is not None:
            self._input = input_tokens
        if output_tokens is not None:
            self._output = output_tokens
        if streaming:
            text = _streamed_text(payload)
            if text:
                self._streamed += count_text_tokens(text)

    def usage(self) -> tuple[int | None, int | None]:
        """``(input_tokens, output_tokens)`` the response reported, each ``None`` if unknown."""
        if not self._stream and self._buffer and not self._overflow:
            self._take(self._buffer, streaming=False)
            self._buffer.clear()
        return self._input, self._output

    @property
    def streamed_tokens(self) -> int:
        """Tokens of text seen in a stream so far (for a stream cut short before its usage)."""
        return self._streamed


class Meter:
    """Follows the response to a reserved request and says how to settle the reservation.

    A failed call (an exception before the response started, or a status of 400 or more) is cancelled: every
    reserved token is refunded. Otherwise the reported usage is charged; a stream that reports no output usage
    (cut short, or not asked for usage) is charged for the text it carried; with nothing known, the
    reservation stands.
    """

    __slots__ = ("_reader", "_reserved", "_status")

    def __init__(self, reserved: tuple[int, int]) -> None:
        self._reserved = reserved
        self._status: int | None = None
        self._reader: UsageReader | None = None

    def start(self, status: int, content_type: str) -> None:
        self._status = status
        if status < 400:
            self._reader = UsageReader(content_type)

    def body(self, chunk: bytes) -> None:
        if self._reader is not None:
            self._reader.feed(chunk)

    def settlement(self) -> tuple[int, int] | None:
        """``(input_tokens, output_tokens)`` to settle with, or ``None`` to cancel."""
        if self._status is None or self._status >= 400 or self._reader is None:
            return None
        reserved_in, reserved_out = self._reserved
        input_tokens, output_tokens = self._reader.usage()
        if output_tokens is None and self._reader.streamed_tokens:
            output_tokens = self._reader.streamed_tokens  # a stream without usage: what it carried
        if input_tokens is None and output_tokens is None:
            return self._reserved
        return (
            reserved_in if input_tokens is None else input_tokens,
            reserved_out if output_tokens is None else output_tokens,
        )
