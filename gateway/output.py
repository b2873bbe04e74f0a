"""A request's output processor: token ids in completion order in, text deltas out.

Workers send token ids only; the gateway turns them into text here, where the client sees
it. Because one processor follows a stream from its first token to its last, whichever
workers produced them, a request resumed on another worker continues exactly: a character
split across the resume point, or text held back for a possible stop string, is carried over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from preprocess.detokenizer import IncrementalDetokenizer
from preprocess.stop_strings import split_at_stop


class OutputProcessor:
    """Incremental UTF-8-safe detokenization and stop strings for one request."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=list(prompt_ids))
        self._stop = tuple(stop)
        self._held = ""
        self.stopped = False
        """A stop string matched: the request is over, whatever the worker does next."""

    def add(self, token_id: int, *, stop_token: bool = False) -> str:
        """The text `token_id` completes; a stop token (EOS, stop_token_ids) adds none."""
        if self.stopped:
            return ""
        return self._cut("" if stop_token else self._detokenizer.add(token_id))

    def piece(self, token_id: int) -> str:
        """The text of `token_id` on its own (IncrementalDetokenizer.piece)."""
        return self._detokenizer.piece(token_id)

    def finish(self) -> str:
        """The request ended: the rest of the text, with U+FFFD for a character cut short."""
        if self.stopped:
            return ""
        text = self._cut(self._detokenizer.flush())
        if not self.stopped:
            text, self._held = text + self._held, ""
        return text

    def _cut(self, delta: str) -> str:
        if not self._stop:
            return delta
        text, self._held, self.stopped = split_at_stop(self._held + delta, self._stop)
        return text
