"""Guided decoding with llguidance: a matcher per request, token masks for the whole batch, matchers
advanced on the tokens a sequence keeps, compiled grammars in an LRU cache keyed by grammar text.

A request's `GuidedDecoding` is plain data (llguidance's grammar text, made and checked in the API
process); matchers are built here, in the engine's process. With `after_reasoning` a matcher waits until
the completion ends with the reasoning end tokens, and constrains everything after them. A matcher
follows the sequence's tokens: preemption by recompute keeps those tokens, so it never rolls back. When
its grammar can take nothing more, the request ends ("stop"), EOS or not.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fdkit.engine.sequence import Sequence
from fdkit.tokenizer import TokenizersVocab

logger = logging.getLogger(__name__)
SPECIAL_PREFIX = b"\xff"  # llguidance's mark of a special token: grammars never match it as text


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """Each id's bytes as our tokenizer decodes it: SentencePiece pieces with `▁` as a space and byte
    pieces as their byte, added tokens as their text (atomic), special and control tokens marked special;
    ids the tokenizer does not have (the model's padding) are empty and never allowed."""
    sp = tokenizer.vocab.sp
    table = [b""] * vocab_size
    for i in range(min(sp.get_piece_size(), vocab_size)):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or i in tokenizer.special_ids:
            table[i] = SPECIAL_PREFIX + piece.encode()
        elif sp.is_byte(i):
            table[i] = bytes([int(piece[3:5], 16)])
        else:
            table[i] = piece.replace("\u2581", " ").encode()
    for i, text in tokenizer.id_to_atomic.items():
        if i < vocab_size:
            table[i] = (SPECIAL_PREFIX if i in tokenizer.special_ids else b"") + text.encode()
    return table


class _TokenSource:
    """What llguidance's TokenizerWrapper reads: the token table, EOS/BOS, and an encoder."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.tokens = token_bytes(tokenizer, vocab_size)
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else tokenizer.eos_token_id
        self.bos_token_id = tokenizer.token_id("bos_token")
        self.special_token_ids = sorted(i for i in tokenizer.special_ids if i < vocab_size)

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text)


def build_lltokenizer(tokenizer, vocab_size: int, eos_token_ids: list[int]):
    """llguidance's view of our tokenizer (special and added tokens atomic). A `tokenizer.json` is read by
    llguidance itself; ValueError if it cannot read it (e.g. a WordPiece decoder), so guided requests get
    a 400 while the model serves everything else."""
    import llguidance

    if isinstance(tokenizer.vocab, TokenizersVocab):
        eos = list(eos_token_ids) or [tokenizer.eos_token_id]
        try:
            return llguidance.LLTokenizer(tokenizer.vocab.json, n_vocab=vocab_size, eos_token=eos)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"guided decoding does not support this model's tokenizer.json: {e}") from None
    source = _TokenSource(tokenizer, vocab_size, eos_token_ids)
    eos = list(eos_token_ids) or [source.eos_token_id]
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(source), eos_token=eos)


def grammar_error(grammar: str, lltokenizer) -> str | None:
    """llguidance's message if `grammar` cannot be compiled, else None."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, lltokenizer)
    return messages[0] if is_error else None


class GrammarChecker:
    """Checks grammars before any engine sees them (thread-safe); remembers the last verdicts."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], cache_size: int = 256):
        self.args = (tokenizer, vocab_size, eos_token_ids)
        self.cache_size = cache_size
        self._verdicts: OrderedDict[str, str | None] = OrderedDict()
        self._lltokenizer = None
        self._lock = threading.Lock()

    def check(self, grammar: str) -> None:
        """ValueError with llguidance's message if `grammar` does not compile."""
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = build_lltokenizer(*self.args)
            verdict = self._verdicts.pop(grammar, "unknown")
        if verdict == "unknown":
            verdict = grammar_error(grammar, self._lltokenizer)
        with self._lock:
            self._verdicts[grammar] = verdict
            while len(self._verdicts) > self.cache_size:
                self._verdicts.popitem(last=False)
        if verdict is not None:
            raise ValueError(verdict)


@dataclass
class _Guide:
    matcher: object  # llguidance.LLMatcher
    is_waiting: bool  # for the end of reasoning


class GuidedDecoder:
    """The engine's matchers, one per guided request, from add to release."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], cache_size: int = 64):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self.cache_size = cache_size
        self.guides: dict[str, _Guide] = {}
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lltokenizer = None
        self._executor = None

    @property
    def num_matchers(self) -> int:
        return len(self.guides)

    def add(self, seq: Sequence) -> None:
        """A matcher for a guided request; ValueError if its grammar does not compile."""
        spec = seq.params.guided_decoding
        if spec is None:
            return
        matcher = self._matcher(spec.grammar)
        if matcher.is_error():
            raise ValueError(f"the grammar could not be compiled: {matcher.get_error()}")
        self.guides[seq.request_id] = _Guide(matcher, spec.after_reasoning)

    def release(self, request_id: str) -> None:
        self.guides.pop(request_id, None)

    def _matcher(self, grammar: str):
        """A fresh matcher: a copy of the cached compiled one (compiled once per grammar text)."""
        from llguidance import LLMatcher

        compiled = self._compiled.pop(grammar, None)
        if compiled is None:
            compiled = LLMatcher(self.lltokenizer, grammar, log_level=0)
        self._compiled[grammar] = compiled
        while len(self._compiled) > self.cache_size:
            self._compiled.popitem(last=False)
        return compiled.deep_copy()

    @property
    def lltokenizer(self):
        if self._lltokenizer is None:  # built on the first guided request
            self._lltokenizer = build_lltokenizer(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._lltokenizer

    def bitmask(self, seqs: list[Sequence]) -> np.ndarray | None:
        """Allowed tokens of each row as llguidance's bitmask ([rows, ceil(vocab / 32)] int32, bit t
        of a row set when token t is allowed; unconstrained rows allow all), or None if no row is."""
        rows = [(g.matcher, i) for i, s in enumerate(seqs) if (g := self._active(s)) is not None]
        if not rows:
            return None
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor()
        bitmask = allocate_token_bitmask(len(seqs), self.vocab_size)
        fill_next_token_bitmask_par(self._executor, rows, bitmask)
        return bitmask

    def _active(self, seq: Sequence) -> _Guide | None:
        guide = self.guides.get(seq.request_id)
        return guide if guide is not None and not guide.is_waiting else None

    def accept(self, seq: Sequence, token_id: int) -> str | None:
        """Advances the request's matcher by the token it keeps (before the token is appended); the
        reason to finish it, if any: "stop" when the grammar is complete, "abort" if the token broke it."""
        guide = self.guides.get(seq.request_id)
        if guide is None:
            return None
        if guide.is_waiting:
            end_ids = seq.params.reasoning_end_token_ids
            tail = [*seq.completion_token_ids[-len(end_ids) :], token_id][-len(end_ids) :]
            guide.is_waiting = bool(end_ids) and tail != end_ids
            return None
        if not guide.matcher.consume_token(token_id):
            logger.error("request %s: token %d broke its grammar", seq.request_id, token_id)
            return "abort"
        return "stop" if guide.matcher.is_stopped() else None
