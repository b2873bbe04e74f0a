"""What a worker publishes about its model in `model:{name}`: the tokenizer files the
gateways tokenize with, the vocabulary, the EOS ids and a sha of the files (a gateway rebuilds
a tokenizer only when the sha changes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from preprocess.tokenizer import TOKENIZER_FILES
from worker.engine.engine import Engine


def model_info(model_dir: str | Path, engine: Engine) -> dict[str, str]:
    """model:{name} fields: tokenizer files (`file:<name>`), the vocabulary and a sha of the
    files. Context limits are per worker (its registration), not per model."""
    digest = hashlib.sha256()
    info: dict[str, str] = {}
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            info[f"file:{name}"] = text
            digest.update(f"{name}\0{len(text)}\0".encode() + text.encode())
    cfg = engine.model_config
    info.update(vocab_size=str(cfg.vocab_size),
                eos_token_ids=json.dumps(list(cfg.eos_token_ids)), sha=digest.hexdigest())
    return info
