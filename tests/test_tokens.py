"""Token estimates before the call, usage read from the response after it, and how a reservation settles."""

from __future__ import annotations

import base64
import gzip
import json
import re
import tracemalloc
import zlib
from collections.abc import Callable

import pytest

from ratelimit_middleware.config import MAX_AMOUNT
from ratelimit_middleware.tokens import Meter, UsageReader, count_text_tokens, estimate
from ratelimit_middleware.usage_chunk import UsageChunkFilter


def sse(*events: object) -> bytes:
    return b"".join(f"data: {json.dumps(event)}\n\n".encode() for event in events) + b"data: [DONE]\n\n"


def test_estimate_reads_prompt_and_output_cap() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert estimate(body) == (100, 50)
    assert estimate({**body, "n": 3}) == (100, 150)
    assert estimate({"messages": [], "max_completion_tokens": 7}) == (0, 7)
    assert estimate({"input": "y" * 40, "max_output_tokens": 9}) == (10, 9)  # the Responses API
    parts = {
        "system": "s" * 8,
        "messages": [{"content": [{"type": "text", "text": "t" * 8}]}],
        "max_tokens": 1,
    }
    assert estimate(parts) == (4, 1)  # Anthropic: system and content parts
    responses = {"instructions": "i" * 6000, "input": "hi", "max_output_tokens": 100}
    assert estimate(responses) == (1501, 100)  # the Responses API's instructions were not counted


@pytest.mark.parametrize(
    "body", [None, [], "text", {"messages": "x", "max_tokens": -5}, {"max_tokens": True}]
)
def test_estimate_never_fails_on_odd_bodies(body: object) -> None:
    prompt, output = estimate(body, default_output_tokens=256)
    assert prompt >= 0 and output == 256


CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}


@pytest.mark.parametrize(
    ("fields", "output"),
    [
        ({"max_tokens": 50000.0}, 50000),
        ({"max_tokens": "50000"}, 50000),
        ({"max_completion_tokens": " +50_000 "}, 50000),
        ({"max_output_tokens": "50000.00"}, 50000),
        ({"max_tokens": 5000, "n": 8.0}, 40000),
        ({"max_tokens": "5000", "n": "8"}, 40000),
        ({"max_tokens": 1e300}, MAX_AMOUNT),
        ({"max_tokens": "9" * 5000}, MAX_AMOUNT),
        ({"max_tokens": 50, "n": "9" * 30}, MAX_AMOUNT),
    ],
)
def test_counts_are_read_as_pydantic_based_servers_read_them(fields: dict[str, object], output: int) -> None:
    """vLLM, SGLang and FastAPI take 50000.0 and "50000" as 50000: they were ignored, and the request was
    reserved the default 1024 output tokens, once."""
    assert estimate({**CHAT, **fields}) == (100, output)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 50.5},
        {"max_tokens": "-5"},
        {"max_tokens": "5."},
        {"max_tokens": "1e3"},
        {"max_tokens": "1__0"},
        {"max_tokens": "\u0665"},  # an Arabic-Indic five: Python's int() takes it, Pydantic does not
        {"max_tokens": float("inf")},
        {"max_tokens": False},
        {"n": 2.5},
        {"n": True},
    ],
)
def test_counts_such_servers_refuse_leave_the_default(fields: dict[str, object]) -> None:
    assert estimate({**CHAT, **fields}, default_output_tokens=256) == (100, 256)


@pytest.mark.parametrize(
    ("fields", "output"),
    [
        ({"prompt": ["a prompt"] * 8}, 8000),
        ({"prompt": [[1, 2], [3]]}, 2000),
        ({"prompt": [1, 2, 3]}, 1000),  # one prompt of token ids
        ({"prompt": "one prompt"}, 1000),
        ({"prompt": ["a", "b"], "n": 3}, 6000),
        ({"prompt": ["a", "b"], "n": 2, "best_of": 5}, 10000),
        ({"prompt": ["a", "b"], "n": 2, "best_of": 1}, 4000),
    ],
)
def test_a_completions_batch_generates_for_each_prompt(fields: dict[str, object], output: int) -> None:
    """Eight prompts and max_tokens=1000 generate 8000 tokens (1000 were reserved); best_of completions are
    generated for each, of which n come back."""
    assert estimate({"model": "m", "max_tokens": 1000, **fields})[1] == output


def test_a_prompt_of_token_ids_counts_one_token_per_id() -> None:
    """Token ids counted nothing: 200 inputs of 400 ids were estimated at no input at all."""
    assert estimate({"input": [[42] * 400] * 200}, default_output_tokens=0) == (80_000, 0)
    assert estimate({"prompt": [1, 2, 3], "max_tokens": 5}) == (3, 5)
    assert estimate({"prompt": ["abcd", [1, 2]], "max_tokens": 5})[0] == 1 + 2
    assert estimate({"input": [True, None, 1.5, [[7]]], "max_tokens": 5}) == (0, 5)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/embeddings", {"model": "e", "input": "x" * 40}, (10, 0)),
        ("/v1/embeddings/", {"model": "e", "input": [[1, 2, 3]], "max_tokens": 50, "n": 2}, (3, 0)),
        ("/v1/moderations", {"model": "omni-moderation-latest", "input": "x" * 40}, (10, 0)),
        ("/v2/rerank", {"query": "x" * 20, "documents": ["d"]}, (0, 0)),
        ("/v1/embeddings", "not json", (0, 0)),
        (
            "/v1/messages/count_tokens",
            {"model": "c", "messages": [{"role": "user", "content": "x" * 40}]},
            (0, 0),
        ),
        ("/tokenize", {"prompt": "x" * 40}, (0, 0)),
        ("/v1/responses", {"model": "m", "input": "x" * 40}, (10, 1024)),  # an embeddings body, generating
        ("/v1/messages", {"model": "c", "messages": [{"role": "user", "content": "x" * 40}]}, (10, 1024)),
        ("/v1/chat/completions", {"messages": [{"content": "x" * 40}]}, (10, 1024)),
    ],
)
def test_endpoints_that_generate_nothing_are_estimated_no_output(
    path: str, body: object, expected: tuple[int, int]
) -> None:
    """Embeddings, moderations and token counts were reserved the default 1024 output tokens: those that
    report no usage kept them, and a budget under 1024 refused them for ever."""
    assert estimate(body, path=path) == expected


def test_count_text_tokens_rounds_up() -> None:
    assert [count_text_tokens(text) for text in ["", "a", "abcd", "abcde"]] == [0, 1, 1, 2]


def test_reads_openai_json_usage_in_pieces() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 34}}).encode()
    reader = UsageReader("application/json")
    for index in range(0, len(body), 7):
        reader.feed(body[index : index + 7])
    assert reader.usage() == (12, 34)


def test_reads_anthropic_and_responses_api_usage() -> None:
    reader = UsageReader("application/json; charset=utf-8")
    reader.feed(json.dumps({"usage": {"input_tokens": 5, "output_tokens": 6}}).encode())
    assert reader.usage() == (5, 6)


def test_reads_the_final_usage_chunk_of_an_openai_stream() -> None:
    body = sse(
        {"choices": [{"delta": {"content": "Hello"}}]},
        {"choices": [{"delta": {"content": " world"}}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    )
    reader = UsageReader("text/event-stream")
    for index in range(0, len(body), 5):  # events split across chunks anywhere
        reader.feed(body[index : index + 5])
    assert reader.usage() == (3, 2)
    assert reader.streamed_tokens == count_text_tokens("Hello") + count_text_tokens(" world")


def test_reads_anthropic_stream_events() -> None:
    body = (
        b'event: message_start\ndata: {"type": "message_start", "message": {"usage": {"input_tokens": 25, '
        b'"output_tokens": 1}}}\n\n'
        b'event: content_block_delta\ndata: {"type": "content_block_delta", '
        b'"delta": {"text": "Hi there"}}\n\n'
        b'event: message_delta\r\ndata: {"type": "message_delta", "usage": {"output_tokens": 15}}\r\n\r\n'
    )
    reader = UsageReader("text/event-stream")
    reader.feed(body)
    assert reader.usage() == (25, 15)


def embeddings_body(inputs: int) -> bytes:
    """OpenAI's answer to embeddings of ``inputs`` texts in base64 (the openai client's default): 8 KiB each,
    the usage last; a nested "usage" after it and one inside a string are not the response's."""
    vector = base64.b64encode(bytes(range(256)) * 24).decode()
    return json.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": index, "embedding": vector} for index in range(inputs)],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 80_000, "total_tokens": 80_000},
            "note": 'not this: "usage": {"prompt_tokens": 1, "total_tokens": 1}',
            "metadata": {"usage": {"prompt_tokens": 2, "total_tokens": 2}},
        }
    ).encode()


def peak_memory_fed(feed: Callable[[bytes], object], body: bytes, step: int) -> int:
    """Feed ``body`` to ``feed`` ``step`` bytes at a time; the peak of the memory traced meanwhile."""
    tracemalloc.start()
    try:
        for index in range(0, len(body), step):
            feed(body[index : index + step])
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("step", [4096, 64 * 1024, 10**7])
def test_usage_at_the_end_of_a_body_past_the_size_kept_is_read_in_bounded_memory(step: int) -> None:
    """A body over ``max_json_size`` (1 MiB) is read for its usage in its last 64 KiB (it was never read: 200
    base64 embeddings were charged the estimate, not their 80,000 tokens), keeping no more than that."""
    body = embeddings_body(200)
    assert len(body) > 1536 * 1024
    reader = UsageReader("application/json")
    peak = peak_memory_fed(reader.feed, body, step)
    assert peak < 2 * 1024 * 1024 + min(step, len(body))
    assert reader.usage() == (80_000, 0)


@pytest.mark.parametrize(
    "tail",
    [
        b'"x": "the end of a long string, then \\"usage\\": {\\"prompt_tokens\\": 5}"}',  # escaped
        b'"data": [{"usage": {"prompt_tokens": 5, "completion_tokens": 1}}], "more": 1}',  # nested
        b'"usage": {"prompt_tokens": 5, "completion_tokens": 1}',  # cut short
    ],
)
def test_no_usage_is_taken_from_the_tail_of_a_large_body_unless_it_is_the_body_s(tail: bytes) -> None:
    reader = UsageReader("application/json", max_json_size=1000)
    reader.feed(b'{"pad": "' + b"x" * 200_000 + b'", ')
    reader.feed(tail)
    assert reader.usage() == (None, None)


def test_meter_settles_with_reported_usage() -> None:
    meter = Meter((100, 500))
    meter.start(200, "application/json")
    meter.body(json.dumps({"usage": {"prompt_tokens": 80, "completion_tokens": 20}}).encode())
    assert meter.settlement() == (80, 20)


def test_meter_caps_reported_usage_at_the_largest_amount() -> None:
    """An upstream reporting more than 2**53 tokens is charged the cap: settling with its number raised, and
    the reservation (and its concurrency slot) was never given back."""
    meter = Meter((100, 500))
    meter.start(200, "application/json")
    meter.body(json.dumps({"usage": {"prompt_tokens": 2**60, "completion_tokens": 2**53 + 1}}).encode())
    assert meter.settlement() == (MAX_AMOUNT, MAX_AMOUNT)


def test_a_decompression_bomb_is_inflated_no_further_than_32_times_its_size() -> None:
    """Inflating in full to find a usage at the end cost the event loop seconds per GiB: past 32 times the
    compressed size (and 16 MiB), the rest is not read, the estimate stands and the log says why."""
    body = (
        b'{"pad": "'
        + b" " * (40 * 1024 * 1024)
        + b'", "usage": {"prompt_tokens": 7, "completion_tokens": 9}}'
    )
    compressed = gzip.compress(body)
    assert len(body) > 32 * len(compressed)
    meter = Meter((100, 500))
    meter.start(200, "application/json", "gzip")
    for start in range(0, len(compressed), 65536):
        meter.body(compressed[start : start + 65536])
    assert meter.unread_encoding == "gzip (inflates too far)"
    assert meter.settlement() == (100, 500)


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
def test_meter_cancels_failed_calls(status: int) -> None:
    meter = Meter((100, 500))
    meter.start(status, "application/json")
    meter.body(b"{}")
    assert meter.settlement() is None


def test_meter_cancels_when_the_app_never_answered() -> None:
    assert Meter((1, 1)).settlement() is None


def test_meter_charges_what_a_stream_without_usage_carried() -> None:
    meter = Meter((100, 500))
    meter.start(200, "text/event-stream")
    meter.body(sse({"choices": [{"delta": {"content": "x" * 40}}]})[:-14])  # cut before [DONE]
    assert meter.settlement() == (100, 10)


def test_meter_keeps_the_estimate_when_nothing_is_known() -> None:
    meter = Meter((100, 500))
    meter.start(200, "text/plain")
    meter.body(b"plain answer")
    assert meter.settlement() == (100, 500)


def anthropic_events(*events: dict[str, object]) -> bytes:
    return b"".join(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events)


MESSAGE_START = {"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}}


def test_anthropic_message_start_usage_is_provisional() -> None:
    """A stream cut before ``message_delta`` is charged its text, not the placeholder ``output_tokens: 1``."""
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x" * 400}}
    meter = Meter((100, 2000))
    meter.start(200, "text/event-stream")
    meter.body(anthropic_events(MESSAGE_START, delta, delta))
    assert meter.settlement() == (25, 200)
    meter.body(anthropic_events({"type": "message_delta", "usage": {"output_tokens": 150}}))
    assert meter.settlement() == (25, 150)  # the final usage, even below the text's estimate


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 8, "total_tokens": 8}, (8, 0)),  # OpenAI's embeddings
        ({"prompt_tokens": 8, "total_tokens": 11}, (8, 3)),
        ({"input_tokens": 8}, (8, 0)),
        ({"prompt_tokens": None, "input_tokens": 5, "completion_tokens": 6}, (5, 6)),
    ],
)
def test_usage_without_output_generated_nothing(usage: dict[str, object], expected: tuple[int, int]) -> None:
    meter = Meter((8, 1024))
    meter.start(200, "application/json")
    meter.body(json.dumps({"object": "list", "data": [], "usage": usage}).encode())
    assert meter.settlement() == expected


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"input_tokens": 3, "cache_creation_input_tokens": 20000, "output_tokens": 5}, (20003, 5)),
        ({"input_tokens": 3, "cache_read_input_tokens": 15000, "output_tokens": 5}, (15003, 5)),
        (
            {"input_tokens": 3, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 900},
            (1003, 0),
        ),
        ({"input_tokens": 3, "cache_creation_input_tokens": None, "output_tokens": 5}, (3, 5)),
        ({"prompt_tokens": 1000, "cache_read_input_tokens": 900, "completion_tokens": 5}, (1000, 5)),
    ],
)
def test_anthropic_cached_prompt_tokens_are_input(
    usage: dict[str, object], expected: tuple[int, int]
) -> None:
    """Anthropic's input_tokens leaves out the cached prompt: a 20,000 token prompt written to the cache was
    charged 3. OpenAI's prompt_tokens counts cached tokens already (some proxies add the fields beside it)."""
    meter = Meter((100, 1000))
    meter.start(200, "application/json")
    meter.body(json.dumps({"type": "message", "usage": usage}).encode())
    assert meter.settlement() == expected


def test_anthropic_cached_prompt_tokens_are_input_in_a_stream() -> None:
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 3, "cache_read_input_tokens": 9000}},
    }
    meter = Meter((100, 1000))
    meter.start(200, "text/event-stream")
    meter.body(anthropic_events(start, {"type": "message_delta", "usage": {"output_tokens": 15}}))
    assert meter.settlement() == (9003, 15)


RESPONSES_STREAM = [
    {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "usage": None}},
    {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "y" * 200},
    {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "y" * 200},
    {
        "type": "response.completed",
        "response": {"id": "resp_1", "usage": {"input_tokens": 7, "output_tokens": 90, "total_tokens": 97}},
    },
]


def test_reads_a_responses_api_stream() -> None:
    """Usage under ``response.usage`` of ``response.completed``; text in the string ``delta``s."""
    body = anthropic_events(*RESPONSES_STREAM)
    reader = UsageReader("text/event-stream")
    reader.feed(body)
    assert reader.usage() == (7, 90) and reader.final
    assert reader.streamed_tokens == 2 * count_text_tokens("y" * 200)
    cut = Meter((100, 1000))
    cut.start(200, "text/event-stream")
    cut.body(anthropic_events(*RESPONSES_STREAM[:3]))
    assert cut.settlement() == (100, 100)  # cut before response.completed: charged its text


GENERATED = "x" * 400


@pytest.mark.parametrize(
    "event",
    [
        {"choices": [{"index": 0, "delta": {"reasoning_content": GENERATED}}]},  # vLLM, DeepSeek
        {"choices": [{"index": 0, "delta": {"reasoning": GENERATED}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": GENERATED, "reasoning": GENERATED}}]},
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": GENERATED}}]}}
            ]
        },
        {"choices": [{"index": 0, "delta": {"function_call": {"arguments": GENERATED}}}]},
        {"choices": [{"index": 0, "delta": {"refusal": GENERATED}}]},
        {"choices": [{"index": 0, "text": GENERATED}]},  # completions
        {"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": GENERATED}},
        {"type": "content_block_delta", "delta": {"type": "input_json_delta", "partial_json": GENERATED}},
        {"type": "response.reasoning_text.delta", "delta": GENERATED},
        {"type": "response.reasoning_summary_text.delta", "delta": GENERATED},
        {"type": "response.function_call_arguments.delta", "delta": GENERATED},
    ],
)
def test_every_kind_of_generated_text_a_stream_carries_is_counted(event: dict[str, object]) -> None:
    """Only chat content and Anthropic's text deltas were counted: a stream of reasoning or tool calls whose
    usage never came was charged nothing for them."""
    meter = Meter((10, 4000))
    meter.start(200, "text/event-stream")
    meter.body(sse(event))
    assert meter.settlement() == (10, count_text_tokens(GENERATED))


@pytest.mark.parametrize(
    "event",
    [
        {"type": "response.audio.delta", "delta": "QUFB" * 100},  # base64 audio, not text
        {"type": ["response.output_text.delta"], "delta": GENERATED},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}},
        {"choices": [{"delta": {"tool_calls": [None, {"function": None}, {"function": {"arguments": 7}}]}}]},
        {"choices": [{"delta": {"tool_calls": "x", "function_call": "y", "content": None}}, None]},
    ],
)
def test_what_is_not_generated_text_counts_nothing(event: dict[str, object]) -> None:
    reader = UsageReader("text/event-stream")
    reader.feed(sse(event))
    assert reader.streamed_tokens == 0


def compressed(body: bytes, encoding: str) -> bytes:
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZip"])
def test_meter_reads_compressed_bodies(encoding: str) -> None:
    json_body = json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 200}}).encode()
    stream = sse(
        {"choices": [{"delta": {"content": "x" * 40}}]}, {"choices": [], "usage": {"prompt_tokens": 3}}
    )
    for content_type, body, expected in [
        ("application/json", json_body, (5, 200)),
        ("text/event-stream", stream, (3, 0)),
    ]:
        sent = compressed(body, encoding.lower())
        meter = Meter((100, 4000))
        meter.start(200, content_type, encoding)
        for index in range(0, len(sent), 7):  # compressed chunks cut anywhere
            meter.body(sent[index : index + 7])
        assert meter.settlement() == expected


def test_a_decompression_bomb_is_never_held_whole() -> None:
    """64 MiB of JSON in 64 KiB of gzip: the meter keeps at most the 1 MiB a JSON body may have, then its
    end."""
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    bomb = compressor.compress(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "pad": "')
    bomb += b"".join(compressor.compress(b" " * (1024 * 1024)) for _ in range(64)) + compressor.flush()
    assert len(bomb) < 128 * 1024
    meter = Meter((100, 500))
    meter.start(200, "application/json", "gzip")
    tracemalloc.start()
    try:
        meter.body(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 1024 * 1024
    assert meter.settlement() == (100, 500)  # no usage in the last 64 KiB: the estimate stands


def test_meter_keeps_the_estimate_for_encodings_it_cannot_read() -> None:
    meter = Meter((100, 500))
    meter.start(200, "application/json", "br")
    meter.body(b"\x1b\x00 brotli bytes")
    assert meter.unread_encoding == "br"
    assert meter.settlement() == (100, 500)


LARGE_IMAGE_STREAM = [
    {"type": "response.created", "response": {"usage": None}},
    {"type": "response.image_generation_call.partial_image", "partial_image_b64": "A" * 1_500_000},
    {"type": "response.output_text.delta", "delta": "y" * 400},
    {"type": "response.completed", "response": {"usage": {"input_tokens": 900, "output_tokens": 1800}}},
]


@pytest.mark.parametrize("step", [1000, 64 * 1024])
def test_an_event_past_the_size_kept_is_skipped_and_the_stream_read_on(step: int) -> None:
    """A 1.5 MB event (a base64 image) stopped the reader: the text and usage after it were never read."""
    body = anthropic_events(*LARGE_IMAGE_STREAM)
    meter = Meter((50, 4000))
    meter.start(200, "text/event-stream")
    assert peak_memory_fed(meter.body, body, step) < 1536 * 1024  # the event is never held whole
    assert meter.settlement() == (900, 1800)
    cut = Meter((50, 4000))
    cut.start(200, "text/event-stream")
    cut.body(anthropic_events(*LARGE_IMAGE_STREAM[:3]))
    assert cut.settlement() == (50, 100)  # no usage: the text after the image is charged


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("size", [1, 2, 7])
def test_reads_streams_with_every_line_ending_the_sse_grammar_allows(
    line_end: bytes, bom: bytes, size: int
) -> None:
    body = bom + sse(
        {"choices": [{"delta": {"content": "Hello"}}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    ).replace(b"\n", line_end)
    reader = UsageReader("text/event-stream")
    for index in range(0, len(body), size):  # a CRLF split between chunks is one line end
        reader.feed(body[index : index + size])
    assert reader.usage() == (3, 2) and reader.streamed_tokens == count_text_tokens("Hello")


def test_meter_reads_gzip_members_one_after_another_and_raw_deflate() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 42}}).encode()
    half = len(body) // 2
    members = gzip_compress(body[:half]) + gzip_compress(body[half:])  # as a server that flushes members
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = raw.compress(body) + raw.flush()
    for encoding, sent in [("gzip", members), ("deflate", raw_deflate)]:
        meter = Meter((100, 100))
        meter.start(200, "application/json", encoding)
        for index in range(0, len(sent), 5):
            meter.body(sent[index : index + 5])
        assert meter.settlement() == (7, 42) and meter.unread_encoding is None, encoding


def test_a_corrupt_compressed_body_keeps_the_estimate_and_says_so() -> None:
    meter = Meter((100, 100))
    meter.start(200, "application/json", "gzip")
    meter.body(b"\x1f\x8b\x08\x00 this is no gzip body")
    assert meter.settlement() == (100, 100) and meter.unread_encoding == "gzip (corrupt)"


def gzip_compress(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def test_gzip_members_that_each_inflate_past_a_step_are_read_once() -> None:
    """A member ending inside a chunk after an output-limited call: the next member is read once, and the
    meter returns (it looped for ever, counting the same text again and again)."""
    delta = b"data: " + json.dumps({"choices": [{"delta": {"content": "word "}}]}).encode() + b"\n\n"
    first = delta * 2000
    last = b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2000}}\n\n'
    meter = Meter((100, 1000))
    meter.start(200, "text/event-stream", "gzip")
    meter.body(gzip_compress(first) + gzip_compress(first + last))
    assert meter.settlement() == (5, 2000)


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_raw_deflate_and_gzip_padding_in_any_chunks(step: int) -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9}}).encode()
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for encoding, sent in [
        ("deflate", raw.compress(body) + raw.flush()),
        ("gzip", gzip_compress(body) + bytes(8)),
    ]:
        meter = Meter((100, 100))
        meter.start(200, "application/json", encoding)
        for index in range(0, len(sent), step):
            meter.body(sent[index : index + step])
        assert meter.settlement() == (7, 9) and meter.unread_encoding is None, encoding


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_the_last_event_of_a_cr_stream_is_read(step: int) -> None:
    """The Responses API ends with response.completed (its usage) and no [DONE]: its closing CR is a line end
    at once, not held back for an LF that never comes."""
    completed = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 12, "output_tokens": 34}},
    }
    body = b"data: " + json.dumps(completed).encode() + b"\r\r"
    reader = UsageReader("text/event-stream")
    for index in range(0, len(body), step):
        reader.feed(body[index : index + step])
    assert reader.usage() == (12, 34)


def test_many_gzip_members_or_much_padding_cost_linear_work() -> None:
    """A flood of empty gzip members in one chunk is read up to a bound (it copied the chunk's rest at each
    member's end: minutes for a few MB); padding is skipped once (it was copied again for every later chunk).
    """
    flood = gzip_compress(b"") * 40_000  # 800 KB of empty members
    meter = Meter((100, 100))
    meter.start(200, "application/json", "gzip")
    meter.body(flood)
    assert meter.unread_encoding == "gzip (corrupt)"  # read no further than _MAX_MEMBERS members
    body = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    padded = Meter((100, 100))
    padded.start(200, "application/json", "gzip")
    padded.body(gzip_compress(body) + bytes(1_000_000))
    for _ in range(2000):
        padded.body(b"\0")
    assert padded.settlement() == (3, 4) and padded.unread_encoding is None


def test_a_long_stream_of_gzip_members_that_carry_text_is_read_to_its_end() -> None:
    """A server that compresses each write as its own member: 12,000 members with text, then the usage."""
    event = b'data: {"choices": [{"delta": {"content": "word "}}]}\n\n'
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 40000}}\n\n'
    body = gzip_compress(event) * 12_000 + gzip_compress(usage)
    meter = Meter((100, 10))
    meter.start(200, "text/event-stream", "gzip")
    meter.body(body)
    assert meter.settlement() == (100, 40000) and meter.unread_encoding is None


@pytest.mark.parametrize(
    ("call", "error", "says"),
    [
        (lambda: estimate(None, -5), ValueError, "default_output_tokens must be >= 0 and <= 2**53, got -5"),
        (lambda: estimate({}, "x"), TypeError, "default_output_tokens must be an int, got 'x'"),  # type: ignore[arg-type]
        (lambda: estimate({}, path=None), TypeError, "path must be a str, got None"),  # type: ignore[arg-type]
        (lambda: count_text_tokens(None), TypeError, "text must be a str, got None"),  # type: ignore[arg-type]
        (lambda: UsageReader(None), TypeError, "content_type must be a str, got None"),  # type: ignore[arg-type]
        (lambda: UsageReader("application/json", -1), ValueError, "max_json_size must be >= 0"),
        (lambda: Meter((1, 1)).start(200, None), TypeError, "content_type must be a str, got None"),  # type: ignore[arg-type]
        (lambda: Meter((1, 1)).start(500, None), TypeError, "content_type must be a str, got None"),  # type: ignore[arg-type]
        (lambda: Meter((1, 1)).start(200, "", None), TypeError, "content_encoding must be a str, got None"),  # type: ignore[arg-type]
        (lambda: Meter((1, 1)).start("200", ""), TypeError, "status must be an int, got '200'"),  # type: ignore[arg-type]
    ],
)
def test_the_public_token_functions_name_a_bad_argument(
    call: Callable[[], object], error: type[Exception], says: str
) -> None:
    """They raised AttributeError ('rstrip', 'split'), a bare "'<' not supported" or "has no len()", and a
    negative default_output_tokens gave a negative estimate: estimate(None, -5) was (0, -5)."""
    with pytest.raises(error, match=re.escape(says)):
        call()


def filtered(stream: bytes, cuts: list[int]) -> bytes:
    """``stream`` through a ``UsageChunkFilter``, cut at ``cuts``."""
    usage_filter = UsageChunkFilter()
    passed, previous = b"", 0
    for cut in [*cuts, len(stream)]:
        passed += usage_filter.pass_on(stream[previous:cut])
        previous = cut
    return passed + usage_filter.rest()


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_the_usage_chunk_filter_takes_out_that_chunk_wherever_the_stream_is_cut(eol: bytes) -> None:
    """Only the usage chunk without choices goes, the rest as it came: a byte order mark, comments, a chunk
    with choices and usage (whole), [DONE], an event the stream did not complete; cut anywhere, a CRLF too."""
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()
    both = json.dumps({"choices": [{"delta": {"content": "a"}}], "usage": {"prompt_tokens": 1}}).encode()
    kept = [
        b"\xef\xbb\xbfdata: " + json.dumps({"choices": [{"delta": {"content": "hi"}}]}).encode(),
        b": ping",
        b"data: " + both,
        b'data: {"choices": [],' + eol + b'data: "usage": null}',  # no usage object: not the chunk
    ]
    stream = b"".join(event + eol + eol for event in [*kept[:3], b"data: " + usage, kept[3]])
    stream += b"data: [DONE]" + eol + eol + b"data: cut short"
    expected = stream.replace(b"data: " + usage + eol + eol, b"")
    assert filtered(stream, []) == expected
    assert filtered(stream, list(range(1, len(stream)))) == expected
    for cut in range(len(stream) + 1):
        assert filtered(stream, [cut]) == expected


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_the_usage_chunk_filter_takes_out_that_chunk_when_it_ends_the_stream(eol: bytes) -> None:
    """A bare CR that ends the body ends a line: the usage chunk ending a CR stream passed on."""
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()
    first = b'data: {"choices": [{"delta": {"content": "a"}}]}' + eol + eol
    stream = first + b"data: " + usage + eol + eol
    for cut in range(len(stream) + 1):
        assert filtered(stream, [cut]) == first


def test_the_usage_chunk_filter_holds_back_no_more_than_an_event_and_a_bound() -> None:
    usage_filter = UsageChunkFilter()
    assert usage_filter.pass_on(b"data: 1\n\ndata: {") == b"data: 1\n\n"
    assert usage_filter.pass_on(b'"choices": [], "usage": {}}\n') == b""
    assert usage_filter.pass_on(b"\ndata: 2\n\n") == b"data: 2\n\n"
    large = b"data: " + b"x" * (64 * 1024)  # past the bound: no usage chunk, on as it comes
    assert usage_filter.pass_on(large) == large[:-3]
    assert usage_filter.pass_on(b"\n\n") == large[-3:] + b"\n\n"
    assert usage_filter.rest() == b""


@pytest.mark.parametrize(
    ("content_type", "length", "encoding", "applies"),
    [
        ("text/event-stream; charset=utf-8", "", "", True),
        ("Text/Event-Stream", "", "identity", True),
        ("text/event-stream", "120", "", False),
        ("text/event-stream", "", "gzip", False),
        ("application/json", "", "", False),
    ],
)
def test_the_usage_chunk_filter_applies_to_streams_it_can_change(
    content_type: str, length: str, encoding: str, applies: bool
) -> None:
    assert UsageChunkFilter.applies(content_type, length, encoding) is applies
