"""Incremental detokenization that never emits half a character.

Byte-level BPE splits a Chinese character or an emoji across tokens, so decoding one token at
a time yields U+FFFD. This follows TGI's `decode_token`: decode a short window ending at the
newest token twice, once without the tokens not yet emitted (`prefix_offset:read_offset`) and
once with them (`prefix_offset:`), emit the difference, and hold it back while it ends in
U+FFFD. The window starts a few tokens back, so tokenizers that drop a leading space when a
piece is decoded alone (SentencePiece's `▁`) still get it right.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT = 5
"""Prompt tokens decoded as context before the first generated token, as in TGI."""
_TRIM_AT = 64


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas, one token at a time.

    Each `add` costs one or two decodes of a few tokens, whatever the length of the output.
    Not thread-safe; make one per request.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._decode = _fast_decoder(tokenizer, skip_special_tokens)
        self._decode_one = _fast_decoder(tokenizer, False)
        self._ids: list[int] = list((prompt_ids or [])[-PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def piece(self, token_id: int) -> str:
        """The text of `token_id` on its own, special tokens included (a piece of a
        multi-byte character decodes to U+FFFD): what log-probabilities are shown against."""
        return self._decode_one([token_id])

    def add(self, token_id: int) -> str:
        """Append `token_id` and return the newly completed text (often "")."""
        self._ids.append(token_id)
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        if self._prefix_offset > _TRIM_AT:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """Emit whatever is held back; call once when the request ends.

        Only output that really ends in invalid UTF-8 is still held at the end, and it comes
        out with U+FFFD in place of the broken bytes.
        """
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = None
        delta = new_text[len(prefix_text) :]
        if delta:
            self._chunks.append(delta)
        return delta


def _fast_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """Decode through the Rust `tokenizers.Tokenizer` when the tokenizer has one (about 1 µs
    for a few ids, against a few µs through transformers), else through `decode`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    # A transformers tokenizer that cleans up spaces, or a bare tokenizers.Tokenizer.
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
