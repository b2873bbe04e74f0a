"""Evaluation and calibration texts: the shipped default set, or a user's file.

A file is JSON Lines, one object per text with at least `text` (and optionally `id`, `lang`,
`kind`, and `question`, a prompt to answer greedily when showing demo answers), or plain text
with one text per non-empty line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from common.errors import InvalidRequestError

DEFAULT_PROMPTS = "eval_prompts.jsonl"
"""Package data in worker/quant: English and Chinese questions with answers, prose, code and
two long passages (about 3,500 SmolLM2 tokens in all)."""


@dataclass(frozen=True, slots=True)
class EvalText:
    id: str
    text: str
    lang: str = ""
    kind: str = ""
    question: str | None = None
    """A question to ask the model in chat form (demo answers); None for plain texts."""


def load_texts(path: str | Path | None = None) -> list[EvalText]:
    """The texts of `path`, or the default evaluation set when it is None."""
    if path is None:
        raw = resources.files("worker.quant").joinpath(DEFAULT_PROMPTS).read_text("utf-8")
        name = DEFAULT_PROMPTS
        jsonl = True
    else:
        file = Path(path)
        if not file.is_file():
            raise InvalidRequestError("prompts", f"{file} does not exist")
        raw, name, jsonl = file.read_text("utf-8"), str(file), file.suffix == ".jsonl"
    texts = [_parse(line, i, name, jsonl) for i, line in enumerate(raw.splitlines(), 1)
             if line.strip()]
    if not texts:
        raise InvalidRequestError("prompts", f"{name} holds no texts")
    return texts


def _parse(line: str, number: int, name: str, jsonl: bool) -> EvalText:
    if not jsonl:
        return EvalText(id=f"line-{number}", text=line)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidRequestError("prompts", f"{name}:{number} is not JSON: {e.msg}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"]:
        raise InvalidRequestError("prompts", f"{name}:{number} needs a non-empty \"text\"")
    return EvalText(id=str(obj.get("id", f"line-{number}")), text=obj["text"],
                    lang=str(obj.get("lang", "")), kind=str(obj.get("kind", "")),
                    question=obj.get("question"))
