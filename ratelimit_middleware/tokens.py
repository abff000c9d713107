"""Token arithmetic for LLM requests: estimate before the call, read the real usage after it.

``estimate(body, path=...)`` reads an OpenAI- or Anthropic-style JSON request: the prompt (``messages``,
``prompt``, ``input``, ``system``, the Responses API's ``instructions``) at about four characters per token,
or exactly with ``tiktoken`` when it is installed (a prompt of token ids counts one token per id), plus the
output cap (``max_tokens``, ``max_completion_tokens`` or ``max_output_tokens``, else
``default_output_tokens``) times the completions asked for (``n``, or ``best_of`` when larger, for each
prompt of a completions batch). Counts are read as Pydantic-based servers read them: ``50000.0`` and
``"50000"`` are 50000. An endpoint that generates nothing (embeddings, a token count) is known by its path.

``UsageReader`` watches a response go by without holding it: a JSON body (OpenAI ``usage.prompt_tokens`` /
``completion_tokens``, the Responses API's and Anthropic's ``input_tokens`` / ``output_tokens``) or a
server-sent event stream (the final chunk's ``usage``; Anthropic's ``message_start`` and ``message_delta``
events; the Responses API's ``response.completed``). Its memory is bounded: it keeps a JSON body whole up to
``max_json_size`` bytes and of a larger one its last ``_TAIL_SIZE`` bytes, where providers put the usage; of
a stream, one event at a time, skipping any event larger than ``max_json_size``. It counts the text a stream
generates (content, reasoning, tool call arguments) so that a stream cut short before its final usage can
still be charged for what was produced. ``Meter`` feeds it, inflating gzip and deflate bodies.
"""

from __future__ import annotations

import importlib
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .config import MAX_AMOUNT, check_amount

__all__ = ["DEFAULT_OUTPUT_TOKENS", "Meter", "UsageReader", "count_text_tokens", "estimate", "token_pair"]

DEFAULT_OUTPUT_TOKENS = 1024
"""The output estimate when a request sets no output cap."""

_CAP_FIELDS = ("max_completion_tokens", "max_output_tokens", "max_tokens")
_PROMPT_FIELDS = ("system", "instructions", "messages", "prompt", "input")
_COUNTING_PATHS = ("/count_tokens", "/tokenize", "/detokenize")
"""Endpoints that run a tokenizer, not a model (Anthropic's token count, vLLM's): a request only."""
_READING_PATHS = ("/embeddings", "/embed", "/moderations", "/rerank", "/score", "/classify", "/pooling")
"""Endpoints that read their input and generate nothing (OpenAI's, Cohere's, vLLM's): no output."""
_MAX_EVENT_SIZE = 1024 * 1024
_TAIL_SIZE = 64 * 1024
"""What is kept of the end of a JSON body larger than ``max_json_size``: the usage comes last (OpenAI's base64
embeddings of many inputs, or a long completion with logprobs, pass 1 MiB before it)."""
# A "usage" key: its quotes are string delimiters, not escaped ones inside a string (a byte before the
# opening quote is required, so that a tail cut after a backslash cannot begin with an escaped quote).
_USAGE_KEY = re.compile(rb'(?<=[^\\])"usage"\s*:\s*\{')
_TAIL_TRIES = 16  # "usage" keys tried, the last first, before a tail is taken to hold no top-level one
_CACHE_FIELDS = ("cache_creation_input_tokens", "cache_read_input_tokens")
"""Anthropic's usage fields for the prompt written to and read from its cache, outside ``input_tokens``."""
_ANTHROPIC_DELTAS = ("text", "thinking", "partial_json")
"""The fields of Anthropic's content block deltas that carry generated text: text, thinking, tool input."""
_RESPONSES_DELTAS = tuple(  # a tuple: an event's "type" may be unhashable
    f"response.{kind}.delta"
    for kind in (
        "output_text",
        "refusal",
        "reasoning_text",
        "reasoning_summary_text",
        "function_call_arguments",
        "custom_tool_call_input",
        "mcp_call_arguments",
        "code_interpreter_call_code",
        "shell_call_command",
        "audio.transcript",
    )
)
"""The Responses API's events whose ``delta`` is generated text (not ``response.audio.delta``, base64 audio,
nor a shell call's output, which the tool made)."""
_DIGITS = re.compile(r"\s*\+?(\d+(?:_\d+)*)(?:\.0+)?\s*", re.ASCII)
"""An int as Pydantic reads one from a string: spaces around, a plus sign, underscores, a ``.0``."""
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
"""The ``Content-Encoding`` values the meter inflates (``deflate`` is zlib's format, as RFC 9110 says)."""
_INFLATE_STEP = 64 * 1024
_BOM = b"\xef\xbb\xbf"
_FEED = 4096  # compressed bytes given to zlib at a time
_MAX_MEMBERS = 10_000  # empty gzip members read in a row (a flood of them would be read for nothing)
_INFLATE_RATIO = 32  # inflated bytes per compressed byte, past _INFLATE_FREE: more is a decompression bomb
_INFLATE_FREE = 16 * 1024 * 1024  # inflated bytes any body may reach whatever its ratio
_HEAD_KEPT = 64  # bytes kept to read a deflate body again without zlib's header (it fails in its first two)


def _tiktoken_counter() -> Callable[[str], int] | None:
    try:
        tiktoken = importlib.import_module("tiktoken")  # optional: more exact counts when installed
        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception:  # not installed, or its encoding file cannot be had offline
        return None
    return lambda text: len(encoding.encode(text, disallowed_special=()))


_TIKTOKEN = _tiktoken_counter()


def _check_str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}")
    return value


def count_text_tokens(text: str) -> int:
    """Tokens in ``text``: exact with tiktoken installed, else about one per four characters."""
    _check_str(text, "text")
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


def _requested(value: object) -> int | None:
    """A count a request asks for (``max_tokens``, ``n``, ``best_of``) as the server reads it: an int >= 0, or
    one written as an integral float (``50000.0``) or a string of digits (``"50000"``), which Pydantic-based
    servers (vLLM, SGLang, FastAPI) take as that int; ``None`` for what they refuse (a negative or fractional
    number, a bool, a word). One too long to be a count is more than any limit."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and (digits := _DIGITS.fullmatch(value)):
        number = digits[1].replace("_", "").lstrip("0")
        value = int(number or "0") if len(number) <= 16 else MAX_AMOUNT  # int() refuses 4,300 digits
    return _whole(value)


def _first_whole(
    mapping: Mapping[str, Any], names: Iterable[str], read: Callable[[object], int | None] = _whole
) -> int | None:
    """The first of the fields ``names`` holding an int >= 0 (providers spell one count several ways);
    ``read``: what counts as one."""
    return next((value for name in names if (value := read(mapping.get(name))) is not None), None)


def _prompts(prompt: object) -> int:
    """How many prompts a completions request's ``prompt`` gives, each generating its own completions: one
    per string or token list in a list (a list of ints is one prompt, of token ids)."""
    if not isinstance(prompt, list):
        return 1
    return max(1, sum(isinstance(item, (str, list)) for item in prompt))


def token_pair(value: object, source: str) -> tuple[int, int]:
    """``value`` if it is ``(input_tokens, output_tokens)``, two ints >= 0 (any above ``MAX_AMOUNT`` counts
    as that much: more than any limit, never to pass), as a user's function must answer; else a
    ``TypeError`` naming ``source`` (``"the estimator"``) and the value."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        try:
            return (
                check_amount(_capped(value[0]), "input_tokens"),
                check_amount(_capped(value[1]), "output_tokens"),
            )
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{source} must return (input_tokens, output_tokens), two ints >= 0, got {value!r}")


def _capped(amount: object) -> object:
    """A token count a user's estimator or usage function answered, at most ``MAX_AMOUNT``: a larger one is
    a request no limit lets through (a 429), not an error that the failure policy would let through."""
    if isinstance(amount, int) and not isinstance(amount, bool) and amount > MAX_AMOUNT:
        return MAX_AMOUNT
    return amount


def _token_ids(value: object, nested: bool = False) -> int:
    """Token ids in a ``prompt`` or ``input`` (a list of ints, or a list of such lists): one token each."""
    if not isinstance(value, list):
        return 0
    return sum(
        1 if isinstance(item, int) and not isinstance(item, bool) else 0 if nested else _token_ids(item, True)
        for item in value
    )


def estimate(
    body: object, default_output_tokens: int = DEFAULT_OUTPUT_TOKENS, path: str = ""
) -> tuple[int, int]:
    """``(input_tokens, output_tokens)`` expected for a request body to ``path``; ``(0, default)`` when it is
    not JSON. An endpoint that generates nothing (``_READING_PATHS``) is estimated no output, and one that
    runs no model (``_COUNTING_PATHS``) nothing at all: told by the path, as a body does not tell them apart
    from one to generate from (embeddings and the Responses API both take an ``input``).
    ``default_output_tokens`` is an int from 0 to ``MAX_AMOUNT``."""
    check_amount(default_output_tokens, "default_output_tokens")  # a negative one gave a negative estimate
    endpoint = _check_str(path, "path").rstrip("/")
    if endpoint.endswith(_COUNTING_PATHS):
        return 0, 0
    generates = not endpoint.endswith(_READING_PATHS)
    if not isinstance(body, dict):
        return 0, default_output_tokens if generates else 0
    text = "".join(piece for key in _PROMPT_FIELDS if key in body for piece in _texts(body[key]))
    prompt = count_text_tokens(text) if text else 0
    prompt += _token_ids(body.get("prompt")) + _token_ids(body.get("input"))
    if not generates:
        return min(prompt, MAX_AMOUNT), 0
    cap = _first_whole(body, _CAP_FIELDS, _requested)
    # best_of: completions generated server-side, of which the n best are returned
    per_prompt = max(_requested(body.get("n")) or 1, _requested(body.get("best_of")) or 0)
    completions = per_prompt * _prompts(body.get("prompt"))
    output = (default_output_tokens if cap is None else cap) * completions
    return min(prompt, MAX_AMOUNT), min(output, MAX_AMOUNT)  # as `_capped`: more than any limit


def _usage_of(payload: Any) -> tuple[dict[str, Any] | None, bool]:
    """The usage object a JSON payload carries, and whether it is final.

    Final: a top-level ``usage`` (a JSON body, OpenAI's last stream chunk, Anthropic's ``message_delta``) or
    the Responses API's ``response.usage`` (``response.completed``). Anthropic's ``message_start`` carries a
    provisional one: its input is exact, its ``output_tokens`` a placeholder (1) for what is still to come.
    """
    if not isinstance(payload, dict):
        return None, False
    usage = payload.get("usage")
    if isinstance(usage, dict):
        return usage, True
    for holder, final in (("response", True), ("message", False)):
        inner = payload.get(holder)
        usage = inner.get("usage") if isinstance(inner, dict) else None
        if isinstance(usage, dict):
            return usage, final
    return None, False


def _counts(usage: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(input, output)`` of a usage object, in any of the providers' spellings.

    A usage that gives the input but no output (OpenAI's embeddings: ``prompt_tokens`` and ``total_tokens``)
    generated ``total - input``, else nothing: the output is then 0, not unknown. Anthropic's
    ``input_tokens`` leaves out the prompt it wrote to or read from its cache, which is input all the same:
    ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` are added to it (not to a
    ``prompt_tokens``, which counts cached tokens already, as OpenAI's ``input_tokens`` does; those have no
    such fields).
    """
    input_tokens = _first_whole(usage, ("prompt_tokens", "input_tokens"))
    output_tokens = _first_whole(usage, ("completion_tokens", "output_tokens"))
    if output_tokens is None and input_tokens is not None:
        total = _whole(usage.get("total_tokens"))
        output_tokens = total - input_tokens if total is not None and total >= input_tokens else 0
    if _whole(usage.get("prompt_tokens")) is None:
        cached = [count for name in _CACHE_FIELDS if (count := _whole(usage.get(name))) is not None]
        if cached:
            input_tokens = (input_tokens or 0) + sum(cached)
    return input_tokens, output_tokens


def _choice_texts(choice: object) -> Iterator[object]:
    """What one streamed choice generated: a completion's ``text``; a chat delta's ``content``, ``refusal``,
    reasoning (``reasoning_content`` of vLLM and DeepSeek, else ``reasoning``, which some send beside it) and
    the arguments of its tool calls or legacy function call. Pieces that are not strings are left to the
    caller to drop."""
    if not isinstance(choice, dict):
        return
    yield choice.get("text")
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    reasoning = delta.get("reasoning_content")
    if not (isinstance(reasoning, str) and reasoning):
        reasoning = delta.get("reasoning")
    yield from (delta.get("content"), delta.get("refusal"), reasoning)
    calls = delta.get("tool_calls")
    for call in [*(calls if isinstance(calls, list) else ()), {"function": delta.get("function_call")}]:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            yield function.get("arguments")


def _streamed_text(payload: Any) -> str:
    """The generated text a stream event carries, as OpenAI chat and completions chunks, Anthropic's
    ``content_block_delta`` (text, thinking, tool input JSON) and the Responses API's deltas carry it."""
    if not isinstance(payload, dict):
        return ""
    pieces: list[object] = []
    choices = payload.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            pieces.extend(_choice_texts(choice))
    delta = payload.get("delta")
    if isinstance(delta, dict):  # Anthropic's content_block_delta
        pieces.extend(delta.get(field) for field in _ANTHROPIC_DELTAS)
    elif payload.get("type") in _RESPONSES_DELTAS:
        pieces.append(delta)
    return "".join(piece for piece in pieces if isinstance(piece, str))


def _parsed(data: bytes | bytearray) -> Any:
    """The JSON value of ``data``; ``None`` if it is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def is_event_stream(content_type: str) -> bool:
    """Whether a ``Content-Type`` is that of server-sent events."""
    return content_type.split(";")[0].strip().lower() == "text/event-stream"


def event_payload(event: bytes | bytearray) -> Any:
    """The JSON value of a server-sent event, its line ends as LF: its ``data`` lines joined; ``None`` for an
    event without data, OpenAI's ``[DONE]``, or data that is not JSON."""
    data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
    return None if not data or data == b"[DONE]" else _parsed(data)


class UsageReader:
    """Reads token usage from a response as its body chunks go by (it never changes or holds them)."""

    __slots__ = (
        "_after_cr",
        "_begun",
        "_buffer",
        "_final",
        "_input",
        "_max_json_size",
        "_output",
        "_scanned",
        "_skipping",
        "_stream",
        "_streamed",
        "_tail",
    )

    def __init__(self, content_type: str, max_json_size: int = _MAX_EVENT_SIZE) -> None:
        content_type = _check_str(content_type, "content_type")
        self._stream = is_event_stream(content_type)
        self._max_json_size = check_amount(max_json_size, "max_json_size")
        self._buffer = bytearray()
        self._tail = False  # a JSON body past max_json_size: only its end is kept
        self._skipping = False  # a stream's event past max_json_size: skipped to the blank line ending it
        self._scanned = 0  # bytes of the buffer known to hold no event end
        self._input: int | None = None
        self._output: int | None = None
        self._final = False
        self._streamed = 0
        self._after_cr = False  # a stream's last chunk ended in CR
        self._begun = False  # a stream's first bytes were looked at (for a byte order mark)

    def feed(self, chunk: bytes) -> None:
        """Look at the next body chunk."""
        if not chunk:
            return
        if self._stream:
            self._buffer += self._lines(chunk)
            self._read_events()
            return
        buffer = self._buffer
        if self._tail and len(chunk) >= _TAIL_SIZE:
            buffer[:] = chunk[-_TAIL_SIZE:]
            return
        buffer += chunk
        self._tail = self._tail or len(buffer) > self._max_json_size
        if self._tail and len(buffer) > 2 * _TAIL_SIZE:  # trimmed now and then, not at every chunk
            del buffer[:-_TAIL_SIZE]

    def _lines(self, chunk: bytes) -> bytes:
        """A stream's chunk with its line ends as LF: the SSE grammar allows LF, CRLF and CR (a CRLF may be
        cut between two chunks), and a byte order mark at the start of the stream."""
        if self._after_cr and chunk.startswith(b"\n"):  # the LF of a CRLF whose CR ended the last chunk
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def _read_events(self) -> None:
        """Read every complete event in the buffer, in one pass; keep the incomplete rest, unless it is past
        ``max_json_size`` (a base64 image, say): that event is skipped, and the events after it are read."""
        buffer = self._buffer
        if not self._begun:  # a byte order mark may begin the stream, in one chunk or several
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                return
            if buffer.startswith(_BOM):
                del buffer[: len(_BOM)]
            self._begun = True
        start = 0
        # Where an event end may begin: not in what was searched before, but its last LF may start one.
        while (end := buffer.find(b"\n\n", max(start, self._scanned - 1))) >= 0:
            if not self._skipping:
                self._read_event(buffer[start:end])
            self._skipping = False
            start = end + 2
            self._scanned = 0
        del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > self._max_json_size or self._skipping:
            self._skipping = True
            del buffer[:-1]  # an LF here may be half of the blank line that ends the event
            self._scanned = len(buffer)

    def _read_event(self, event: bytes | bytearray) -> None:
        """Take the usage and count the generated text of one event."""
        payload = event_payload(event)
        if payload is not None:
            self._read(payload)
            text = _streamed_text(payload)
            if text:
                self._streamed += count_text_tokens(text)

    def _read(self, payload: Any) -> None:
        """Take the usage a parsed body or event carries, if any."""
        usage, final = _usage_of(payload)
        if usage is not None:
            input_tokens, output_tokens = _counts(usage)
            if input_tokens is not None:
                self._input = input_tokens
            if output_tokens is not None:
                self._output = output_tokens
                self._final = self._final or final

    def _read_tail(self) -> None:
        """The top-level usage in the end of a JSON body too large to keep: the last ``"usage"`` key after
        which the rest of the body parses as the rest of one object (a ``"usage"`` nested deeper leaves more
        to close, one inside a string is escaped)."""
        tail = bytes(self._buffer)
        starts = [match.start() for match in _USAGE_KEY.finditer(tail)]
        for start in reversed(starts[-_TAIL_TRIES:]):
            payload = _parsed(b"{" + tail[start:])
            if payload is not None:
                self._read(payload)
                return

    def usage(self) -> tuple[int | None, int | None]:
        """``(input_tokens, output_tokens)`` the response reported, each ``None`` if unknown."""
        if not self._stream and self._buffer:
            if self._tail:
                self._read_tail()
            else:
                self._read(_parsed(self._buffer))
            self._buffer.clear()
        return self._input, self._output

    @property
    def final(self) -> bool:
        """Whether ``usage()``'s output is a final report (not Anthropic's provisional ``message_start``)."""
        return self._final

    @property
    def streamed_tokens(self) -> int:
        """Tokens of text seen in a stream so far (for a stream cut short before its usage)."""
        return self._streamed


class _Inflater:
    """Inflates a gzip or deflate body as it goes by, at most ``_INFLATE_STEP`` bytes at a time.

    A body that inflates hugely (a decompression bomb) is thus never held whole: the reader keeps what it
    keeps of any body (one event, ``max_json_size`` of JSON or the end of a larger body). A gzip body of
    several members is read member after member (NUL padding between or after them is skipped; after
    ``_MAX_MEMBERS`` empty ones in a row the rest is not read); a ``deflate`` body sent raw, without zlib's
    header (some servers do), is read as such. Chunks go in by ``_FEED`` bytes, so that what a member's end
    leaves over stays small whatever the chunk. Inflating stops past ``_INFLATE_RATIO`` times the compressed
    size (and ``_INFLATE_FREE``): a bomb would cost the event loop seconds. ``failed``: the rest cannot be
    read, and why (``"corrupt"``, ``"inflates too far"``).
    """

    __slots__ = (
        "_between",
        "_fed",
        "_head",
        "_members",
        "_out",
        "_wbits",
        "_zlib",
        "encoding",
        "failed",
        "inflated",
    )

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._wbits = _WBITS[encoding]
        self._zlib = zlib.decompressobj(self._wbits)
        self._members = 0  # ended in a row without output
        self._between = False  # a member ended and the next has not begun: NUL bytes here are padding
        # What went in before anything came out, read again as raw deflate if zlib's header was not there.
        self._head: bytes | None = b""
        self._fed = 0  # compressed bytes in
        self._out = 0  # inflated bytes out
        self.failed: str | None = None
        self.inflated = False  # any byte yet

    def pieces(self, chunk: bytes) -> Iterator[bytes]:
        """The inflated bytes of the next compressed chunk, a bounded piece at a time."""
        view = memoryview(chunk)
        for start in range(0, len(view), _FEED):
            data = view[start : start + _FEED].tobytes()
            self._fed += len(data)
            for piece in self._inflate(data):
                self._out += len(piece)
                if self._out > max(_INFLATE_FREE, _INFLATE_RATIO * self._fed):
                    self.failed = "inflates too far"
                    return
                yield piece
            if self.failed:
                return

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        pending = False
        while self.failed is None:
            if self._zlib.eof:  # the end of a member: what follows starts the next one
                data = self._zlib.unused_data + data
                self._zlib = zlib.decompressobj(self._wbits)
                self._members += (
                    1  # in a row without output: a stream of members that each carry text is fine
                )
                self._between = True
                if self._members > _MAX_MEMBERS:
                    self.failed = "corrupt"
                    return
            if self._between:
                data = data.lstrip(b"\0")
                if not data:
                    return
                self._between = False
            elif not data and not pending:
                return
            try:
                piece = self._zlib.decompress(data, _INFLATE_STEP)
            except zlib.error:
                if not self.inflated and self._wbits == zlib.MAX_WBITS and self._head is not None:
                    self._wbits = -zlib.MAX_WBITS  # deflate without zlib's header: all of it again, raw
                    self._zlib = zlib.decompressobj(self._wbits)
                    data, pending, self._head = self._head + data, False, None
                    continue
                self.failed = "corrupt"
                return
            if not self.inflated and self._head is not None:  # what went in with nothing out yet
                taken = self._head + data[: len(data) - len(self._zlib.unconsumed_tail)]
                self._head = taken if len(taken) <= _HEAD_KEPT else None
            pending = len(piece) == _INFLATE_STEP  # more may be waiting inside, with no input left
            if piece:
                self.inflated = True
                self._members = 0
                yield piece
            # At a member's end, what follows is in unused_data (unconsumed_tail may repeat it).
            data = b"" if self._zlib.eof else self._zlib.unconsumed_tail


class Meter:
    """Follows the response to a reserved request and says how to settle the reservation.

    A failed call (an exception before the response started, or a status of 400 or more) is cancelled: every
    reserved token is refunded. Otherwise the reported usage is charged, except that a stream whose final
    usage never came (cut short, not asked for usage, or only Anthropic's provisional ``message_start``) is
    charged at least the text it carried as output; with nothing known, or a body in an encoding it cannot
    read (``unread_encoding``, e.g. ``br``), the reservation stands. gzip and deflate bodies are inflated.
    """

    __slots__ = ("_inflater", "_reader", "_reserved", "_status", "unread_encoding")

    def __init__(self, reserved: tuple[int, int]) -> None:
        self._reserved = reserved
        self._status: int | None = None
        self._reader: UsageReader | None = None
        self._inflater: _Inflater | None = None
        self.unread_encoding: str | None = None

    def start(self, status: int, content_type: str, content_encoding: str = "") -> None:
        """The response starts: its status and its ``Content-Type`` and ``Content-Encoding`` headers."""
        if isinstance(status, bool) or not isinstance(status, int):
            raise TypeError(f"status must be an int, got {status!r}")
        _check_str(content_type, "content_type")
        self._status = status
        if status >= 400:
            return
        encoding = _check_str(content_encoding, "content_encoding").strip().lower()
        if encoding in _WBITS:
            self._inflater = _Inflater(encoding)
        elif encoding not in ("", "identity"):
            self.unread_encoding = encoding
            return
        self._reader = UsageReader(content_type)

    def body(self, chunk: bytes) -> None:
        """The next chunk of the response body, as sent (compressed or not)."""
        reader = self._reader
        if reader is None:
            return
        if self._inflater is None:
            reader.feed(chunk)
            return
        inflater = self._inflater
        for piece in inflater.pieces(chunk):
            reader.feed(piece)
        if inflater.failed and self.unread_encoding is None:  # what was read counts; the log says so
            self.unread_encoding = f"{inflater.encoding} ({inflater.failed})"

    def settlement(self) -> tuple[int, int] | None:
        """``(input_tokens, output_tokens)`` to settle with, or ``None`` to cancel."""
        if self._status is None or self._status >= 400:
            return None
        if self._reader is None:  # a body the meter cannot read
            return self._reserved
        reserved_in, reserved_out = self._reserved
        input_tokens, output_tokens = self._reader.usage()
        streamed = self._reader.streamed_tokens
        if streamed and not self._reader.final:  # no final usage: at least the text it carried
            output_tokens = max(output_tokens or 0, streamed)
        if input_tokens is None and output_tokens is None:
            return self._reserved
        # A count past MAX_AMOUNT (a broken or hostile upstream) is charged the cap: settling with it would
        # raise and leave the reservation, and its concurrency slot, held.
        return (
            reserved_in if input_tokens is None else min(input_tokens, MAX_AMOUNT),
            reserved_out if output_tokens is None else min(output_tokens, MAX_AMOUNT),
        )
