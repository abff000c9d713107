"""Token estimates before the call, usage read from the response after it, and how a reservation settles."""

from __future__ import annotations

import json

import pytest

from ratelimit_middleware.tokens import Meter, UsageReader, count_text_tokens, estimate


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


@pytest.mark.parametrize(
    "body", [None, [], "text", {"messages": "x", "max_tokens": -5}, {"max_tokens": True}]
)
def test_estimate_never_fails_on_odd_bodies(body: object) -> None:
    prompt, output = estimate(body, default_output_tokens=256)
    assert prompt >= 0 and output == 256


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


def test_bounded_memory_for_huge_bodies() -> None:
    reader = UsageReader("application/json", max_json_size=100)
    reader.feed(b"{" + b" " * 1000)
    reader.feed(b'"usage": {"prompt_tokens": 1, "completion_tokens": 1}}')
    assert reader.usage() == (None, None)


def test_meter_settles_with_reported_usage() -> None:
    meter = Meter((100, 500))
    meter.start(200, "application/json")
    meter.body(json.dumps({"usage": {"prompt_tokens": 80, "completion_tokens": 20}}).encode())
    assert meter.settlement() == (80, 20)


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
