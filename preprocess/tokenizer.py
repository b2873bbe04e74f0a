"""Tokenizer loading, chat templates and stop ids, shared by the gateway and the worker.

Everything loads from a local model directory: no model hub is reachable, so the Hugging Face
libraries are told to stay offline before they are imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import InvalidRequestError, ModelConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")
"""The files a tokenizer (and its chat template and generation defaults) loads from: what a
worker publishes for the gateways and what a compiled model directory carries along."""

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
"""Roles a chat message may have; the chat template decides how each is rendered."""


def load_tokenizer(model_dir: str | Path) -> Any:
    """Load the Hugging Face tokenizer saved in `model_dir`, never touching the network.

    Raises ModelConfigError when the directory has no tokenizer.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ModelConfigError(f"{path} has no tokenizer.json or tokenizer_config.json")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _validate_messages(messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise InvalidRequestError("messages", "must be a list of {role, content} messages")
    if not messages:
        raise InvalidRequestError("messages", "is empty; send at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError("messages", f"message {i} is not a {{role, content}} mapping")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(
                "messages",
                f"message {i} has role {role!r}; use one of {', '.join(sorted(CHAT_ROLES))}",
            )
        if not isinstance(content, str):
            raise InvalidRequestError("messages", f"message {i} ({role}) has no text content")
        checked.append({"role": role, "content": content})
    return checked


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Render `messages` with the model's chat template and return the prompt text.

    `template_kwargs` reach the template (for example `enable_thinking=False` for Qwen3).
    Raises InvalidRequestError (field "messages") for malformed messages, for a model without a
    chat template, and for conversations the template itself rejects.
    """
    from jinja2 import TemplateError

    checked = _validate_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "messages", "this model has no chat template; send a plain prompt instead"
        )
    try:
        text = tokenizer.apply_chat_template(
            checked, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
    except TemplateError as exc:
        raise InvalidRequestError("messages", f"rejected by the chat template: {exc}") from exc
    return str(text)


def _as_id_list(value: object) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def eos_token_ids(model_dir_or_tokenizer: str | Path | Any) -> list[int]:
    """Every id that ends a generation, in first-seen order without duplicates.

    The union of the tokenizer's eos token and the `eos_token_id` of generation_config.json and
    config.json (each an int or a list). Qwen3, for example, stops on both `<|im_end|>` and
    `<|endoftext|>`. Given a tokenizer, its files are looked up in its `name_or_path` directory.
    """
    model_dir: Path | None
    if isinstance(model_dir_or_tokenizer, str | Path):
        model_dir = Path(model_dir_or_tokenizer)
        tokenizer = load_tokenizer(model_dir)
    else:
        tokenizer = model_dir_or_tokenizer
        name = getattr(tokenizer, "name_or_path", "")
        model_dir = Path(name) if name and Path(name).is_dir() else None
    ids = _as_id_list(getattr(tokenizer, "eos_token_id", None))
    if model_dir is not None:
        for name in ("generation_config.json", "config.json"):
            ids += _as_id_list(_read_json(model_dir / name).get("eos_token_id"))
    return list(dict.fromkeys(ids))
