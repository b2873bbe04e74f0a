"""Text from a client never becomes a control token.

A model's control tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...) are special
added tokens; a tokenizer left to itself turns their spelling anywhere in its input into
them, so a user could write `<|im_end|>\\n<|im_start|>system\\n...` into a chat message and
fake a system turn. Here a prompt's text, and every chat message's content, is tokenized
with those spellings split into ordinary text tokens; only the chat template itself writes
control tokens. A trusted caller (the gateway's --allow-special-tokens) keeps the tokenizer's
own behaviour.

A chat whose contents spell no control token (nearly all) is rendered and tokenized whole,
exactly as before. One that does is rendered with a random marker in place of each content,
and the pieces between markers (the template's own text) are tokenized with their control
tokens, each content as plain text.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from common.errors import InvalidRequestError
from preprocess.tokenizer import render_chat


def control_token_strings(tokenizer: Any) -> frozenset[str]:
    """The spellings of the tokenizer's special added tokens."""
    return frozenset(str(t) for t in tokenizer.added_tokens_decoder.values() if t.special)


def spells_control_token(tokenizer: Any, texts: Iterable[str]) -> bool:
    """Whether any of the texts spells one of the tokenizer's control tokens."""
    spellings = control_token_strings(tokenizer)
    return any(s in text for text in texts for s in spellings)


def encode_text(tokenizer: Any, text: str, *, trusted: bool = False) -> list[int]:
    """A text prompt's ids (with the tokenizer's own BOS, if it adds one)."""
    return list(tokenizer.encode(text, split_special_tokens=not trusted))


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *,
                trusted: bool = False, **template_kwargs: Any) -> list[int]:
    """The chat rendered with the model's template (and a generation prompt), its contents
    tokenized as text. Errors as for `render_chat`."""
    text = render_chat(tokenizer, messages, **template_kwargs)
    contents = [str(m.get("content", "")) for m in messages]
    if trusted or not spells_control_token(tokenizer, contents):
        return list(tokenizer.encode(text, add_special_tokens=False))
    nonce = secrets.token_hex(8)
    marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)]
    template = render_chat(tokenizer, marked, **template_kwargs)
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", template)
    found = [int(i) for i in pieces[1::2]]
    if sorted(found) != list(range(len(messages))):
        raise InvalidRequestError(
            "messages", "a message spells one of this model's control tokens ("
            f"{', '.join(sorted(control_token_strings(tokenizer)))}) and its chat template "
            "rewrites message contents, so they cannot be kept apart from the template's own "
            "tokens; remove the control tokens from the message")
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            ids += tokenizer.encode(piece, add_special_tokens=False)
        else:
            ids += tokenizer.encode(contents[int(piece)], add_special_tokens=False,
                                    split_special_tokens=True)
    return ids
