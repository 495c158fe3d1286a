"""A request's new tokens as streamed text: never half a UTF-8 character, never a piece
of a stop string, and the text cut where a stop string begins (even one spanning
tokens)."""

from __future__ import annotations

from typing import Callable, Sequence

INCOMPLETE = "\ufffd"  # what a byte-level tokenizer decodes half a character to


class TextStream:
    """`push(token)` -> the text that may be sent now. Text is held back while it ends in
    an incomplete character, or in what could be the start of a stop string; when a stop
    string appears, the text before it is the last sent and `stopped` is set.
    `finish()` -> what was held back, once the request has ended otherwise."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.tokens: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already sent
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        # sent text holds no stop string nor the start of one: a new one begins after it
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._send(min(found))
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == INCOMPLETE:
            end -= 1
        return self._send(end - self._stop_prefix(self.text[:end]))

    def finish(self) -> str:
        """The rest of the text (an ending in an incomplete character included)."""
        return "" if self.stopped else self._send(len(self.text))

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest end of `text` that a stop string starts with."""
        for n in range(min(max(map(len, self.stops), default=1) - 1, len(text) - self.sent),
                       0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0

    def _send(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out
