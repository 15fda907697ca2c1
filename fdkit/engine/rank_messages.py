"""What rank 0 sends the driver each step: per output only what is new (token ids, logprobs, text), so
a step's message stays small however long the requests grow. The driver rebuilds full outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from fdkit.engine.llm_engine import RequestOutput
from fdkit.engine.sequence import Sequence


@dataclass
class OutputDelta:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list | None
    num_kept_chars: int  # of the text sent before (the engine's text, held back and cut as it decides)
    new_text: str  # what follows them
    finish_reason: str | None
    finished: bool
    num_reasoning_tokens: int
    metrics: dict = field(default_factory=dict)


class DeltaEncoder:
    """Rank 0's side: remembers how many tokens of each request it has sent."""

    def __init__(self):
        self._num_sent: dict[str, int] = {}
        self._texts: dict[str, str] = {}

    def encode(self, out: RequestOutput) -> OutputDelta:
        start = self._num_sent.get(out.request_id, 0)
        num_kept = _common_prefix_len(self._texts.get(out.request_id, ""), out.text)
        if out.finished:
            self.forget(out.request_id)
        else:
            self._num_sent[out.request_id] = len(out.token_ids)
            self._texts[out.request_id] = out.text
        logprobs = None if out.logprobs is None else out.logprobs[start:]
        return OutputDelta(
            out.request_id, out.token_ids[start:], logprobs, num_kept, out.text[num_kept:], out.finish_reason,
            out.finished, out.num_reasoning_tokens, out.metrics,
        )  # fmt: skip

    def forget(self, request_id: str) -> None:
        self._num_sent.pop(request_id, None)
        self._texts.pop(request_id, None)


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)  # the text grew: the usual case
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class DeltaDecoder:
    """The driver's side: accumulates each request's tokens and logprobs into full outputs."""

    def __init__(self):
        self._token_ids: dict[str, list[int]] = {}
        self._logprobs: dict[str, list] = {}
        self._texts: dict[str, str] = {}

    def decode(self, delta: OutputDelta, seq: Sequence) -> RequestOutput:
        token_ids = self._token_ids.setdefault(delta.request_id, [])
        token_ids += delta.new_token_ids
        text = self._texts.get(delta.request_id, "")[: delta.num_kept_chars] + delta.new_text
        self._texts[delta.request_id] = text
        logprobs = None
        if delta.new_logprobs is not None:
            logprobs = self._logprobs.setdefault(delta.request_id, [])
            logprobs += delta.new_logprobs
        if delta.finished:
            self.forget(delta.request_id)
        return RequestOutput(
            delta.request_id, seq.prompt, seq.prompt_token_ids, text, list(token_ids),
            delta.finish_reason, delta.finished, None if logprobs is None else list(logprobs),
            delta.num_reasoning_tokens, delta.metrics,
        )  # fmt: skip

    def forget(self, request_id: str) -> None:
        self._token_ids.pop(request_id, None)
        self._logprobs.pop(request_id, None)
        self._texts.pop(request_id, None)
