from __future__ import annotations

import pytest

from fdkit.serving.reasoning import ReasoningStream, get_parser

CASES_45 = [
    ("plan step 1</think>The answer is 42", ("plan step 1", "The answer is 42")),
    ("<think>plan</think>42", ("plan", "42")),
    ("still thinking", ("still thinking", "")),
    ("</think>direct", ("", "direct")),
    ("plan</think>\n\n42", ("plan", "42")),
]
CASES_X1 = [
    ("plan\n</think>\n\n<response>\n42\n</response>", ("plan\n", "42\n")),
    ("plan</think>\n<response>42", ("plan", "42")),
    ("plan</think>\n<tool_call>{}</tool_call>", ("plan", "")),
    ("plan</think>\n\nplain answer", ("plan", "plain answer")),
    ("plan", ("plan", "")),
]


@pytest.mark.parametrize(("text", "expected"), CASES_45)
def test_ernie_45_vl_whole_text(text, expected):
    assert get_parser("ernie-45-vl").split(text) == expected


@pytest.mark.parametrize(("text", "expected"), CASES_X1)
def test_ernie_x1_whole_text(text, expected):
    assert get_parser("ernie-x1").split(text) == expected


@pytest.mark.parametrize("name", ["ernie-45-vl", "ernie-x1"])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 100])
def test_stream_equals_whole_text_for_any_chunking(name, chunk_size):
    parser = get_parser(name)
    for text, _ in CASES_45 + CASES_X1:
        stream = ReasoningStream(parser)
        reasoning, answer = "", ""
        for end in range(chunk_size, len(text) + chunk_size, chunk_size):
            r, a = stream.feed(text[:end], final=end >= len(text))
            reasoning, answer = reasoning + r, answer + a
            assert "</" not in r or "</think>" not in text[:end]  # no tag fragment leaks out
        assert (reasoning, answer) == parser.split(text), (name, chunk_size, text)


def test_tag_split_across_chunks_is_held_back():
    stream = ReasoningStream(get_parser("ernie-45-vl"))
    assert stream.feed("abc</th") == ("abc", "")
    assert stream.feed("abc</think>") == ("", "")
    assert stream.feed("abc</think>4") == ("", "4")
    assert stream.feed("abc</think>42", final=True) == ("", "2")


def test_unknown_parser():
    assert get_parser(None) is None
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        get_parser("deepseek")
