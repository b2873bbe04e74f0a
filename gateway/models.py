"""Which models are served, by which live workers, and their tokenizers.

Workers register in `workers` (ZSET) and `worker:{id}` (HASH that expires when heartbeats
stop): a worker is live while its hash exists, and its registration holds its own context
limit (`max_len`): workers of one model may differ. Each served model publishes
`model:{name}` with its tokenizer files (`file:<name>` fields), `vocab_size` and a `sha` of
the files. Tokenizers are rebuilt from those files in a temporary directory and cached by sha for
the life of the process, so a worker publishing a new tokenizer is picked up by its new sha.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from common.capabilities import Capabilities
from common.errors import InvalidRequestError, ModelNotFoundError, UnavailableError
from common.keys import Keys
from gateway.redis_queue import unavailable_on_error
from gateway.types import WorkerInfo
from preprocess.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

_TOKENIZERS: OrderedDict[str, Any] = OrderedDict()
"""sha -> tokenizer, shared by every registry of the process (a tokenizer takes seconds)."""
_TOKENIZER_CACHE_SIZE = 8
_MISS_REFRESH_S = 0.1
"""Youngest snapshot re-read when a request names a model the snapshot does not have."""


@dataclass(frozen=True, slots=True)
class ModelMeta:
    """The limits of one model: `model:{name}` and its live workers' registrations."""

    name: str
    max_len: int
    """The longest context among the model's live workers: what admission allows."""
    vocab_size: int
    sha: str


@dataclass(slots=True)
class ServedModel:
    """A model with at least one live worker, and its tokenizer once loaded."""

    meta: ModelMeta
    workers: list[WorkerInfo] = field(default_factory=list)
    tokenizer: Any = None


def _int(value: object, default: int = 0) -> int:
    try:
        return int(str(value))
    except ValueError:
        return default


class ModelRegistry:
    """A snapshot of live workers and their models, refreshed at most every `max_age_s`."""

    def __init__(self, client: aioredis.Redis, keys: Keys, url: str, *,
                 max_age_s: float = 1.0) -> None:
        self._r = client
        self._keys = keys
        self._url = url
        self._max_age_s = max_age_s
        self._models: dict[str, ModelMeta | None] = {}
        self._workers: dict[str, list[WorkerInfo]] = {}
        self._refreshed = -1e9
        self._refresh_lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self._prefetching: set[asyncio.Task[Any]] = set()

    async def refresh(self, *, max_age_s: float = 0.0) -> None:
        """Re-read the live workers and the info of their models, unless the snapshot is
        younger than `max_age_s`."""
        async with self._refresh_lock:
            if time.monotonic() - self._refreshed < max_age_s:
                return
            async with unavailable_on_error(self._url):
                ids: list[str] = await self._r.zrange(self._keys.workers(), 0, -1)  # type: ignore[assignment]
                pipe = self._r.pipeline(transaction=False)
                for worker_id in ids:
                    pipe.hgetall(self._keys.worker(worker_id))
                regs: list[dict[str, str]] = await pipe.execute()
                workers: dict[str, list[WorkerInfo]] = {}
                for worker_id, reg in zip(ids, regs, strict=True):
                    if reg.get("model"):
                        workers.setdefault(reg["model"], []).append(WorkerInfo(
                            id=worker_id, model=reg["model"], backend=reg.get("backend", ""),
                            device=reg.get("device", ""), capacity=_int(reg.get("capacity")),
                            running=_int(reg.get("running")), max_len=_int(reg.get("max_len")),
                            capabilities=Capabilities.from_fields(reg),
                            draining=reg.get("draining") == "1"))
                names = sorted(workers)
                pipe = self._r.pipeline(transaction=False)
                for name in names:
                    pipe.hmget(self._keys.model(name), ["vocab_size", "sha"])
                infos = await pipe.execute()
            self._workers = workers
            self._models = {
                name: ModelMeta(name, max(w.max_len for w in workers[name]), _int(vocab), sha)
                if sha else None
                for name, (vocab, sha) in zip(names, infos, strict=True)
            }
            self._refreshed = time.monotonic()

    def served(self) -> list[str]:
        """Names of the models with at least one live worker, as of the last refresh."""
        return sorted(self._workers)

    def accepting(self) -> list[str]:
        """Names of the models with a live worker that claims new requests (not draining)."""
        return sorted(name for name, workers in self._workers.items()
                      if any(not w.draining for w in workers))

    def workers(self, name: str) -> list[WorkerInfo]:
        """The live workers of model `name`, as of the last refresh."""
        return list(self._workers.get(name, []))

    def meta(self, name: str) -> ModelMeta | None:
        """The published limits of `name`, or None when it has published none."""
        return self._models.get(name)

    async def resolve(self, name: str, *, tokenizer: bool = True) -> ServedModel:
        """The served model called `name` ("" picks the only one), with its tokenizer.

        Raises ModelNotFoundError for a model no live worker serves (the message lists the
        served ones), InvalidRequestError for "" when several are served, and
        UnavailableError when no model is served at all.
        """
        await self.refresh(max_age_s=self._max_age_s)
        if (name and name not in self._workers) or not self._workers:
            # A worker may have registered since the snapshot; rate-limited, so a flood of
            # requests for an unknown model does not become a flood of Redis reads.
            await self.refresh(max_age_s=_MISS_REFRESH_S)
        served = self.served()
        if not served:
            raise UnavailableError("no live worker serves any model yet; start a worker")
        if not name:
            if len(served) > 1:
                raise InvalidRequestError(
                    "model", f"is required: this gateway serves {', '.join(served)}")
            name = served[0]
        if name not in self._workers:
            raise ModelNotFoundError(
                f"model {name!r} is not served; served models: {', '.join(served)}")
        meta = self._models.get(name)
        if meta is None:
            raise UnavailableError(
                f"model {name!r} has live workers but no published info "
                f"({self._keys.model(name)}); retry once its worker has started")
        model = ServedModel(meta, self.workers(name))
        if tokenizer:
            model.tokenizer = await self._tokenizer(meta)
        return model

    def prefetch(self) -> None:
        """Start loading the tokenizers of served models not loaded yet, in the background,
        so the first request of a new model does not wait seconds for it."""
        for meta in self._models.values():
            if meta is not None and meta.sha not in _TOKENIZERS and not self._prefetching:
                task = asyncio.get_running_loop().create_task(self._prefetch(meta))
                self._prefetching.add(task)
                task.add_done_callback(self._prefetching.discard)

    async def _prefetch(self, meta: ModelMeta) -> None:
        try:
            await self._tokenizer(meta)
        except Exception:  # a request for the model reports it to its client
            log.exception("could not load the tokenizer of %s", meta.name)

    async def close(self) -> None:
        """Stop background tokenizer loads."""
        for task in list(self._prefetching):
            task.cancel()
        await asyncio.gather(*self._prefetching, return_exceptions=True)

    async def _tokenizer(self, meta: ModelMeta) -> Any:
        if meta.sha in _TOKENIZERS:
            _TOKENIZERS.move_to_end(meta.sha)
            return _TOKENIZERS[meta.sha]
        async with self._load_lock:
            if meta.sha in _TOKENIZERS:
                return _TOKENIZERS[meta.sha]
            async with unavailable_on_error(self._url):
                info: dict[str, str] = await self._r.hgetall(  # type: ignore[assignment]
                    self._keys.model(meta.name))
            files = {k[len("file:"):]: v for k, v in info.items() if k.startswith("file:")}
            log.info("loading the tokenizer of %s (sha %s, %d files)",
                     meta.name, meta.sha[:12], len(files))
            tok = await asyncio.to_thread(_load_from_files, files)
            _TOKENIZERS[meta.sha] = tok
            while len(_TOKENIZERS) > _TOKENIZER_CACHE_SIZE:
                _TOKENIZERS.popitem(last=False)
            return tok


def _load_from_files(files: dict[str, str]) -> Any:
    """Write the published tokenizer files to a temporary directory and load them."""
    with tempfile.TemporaryDirectory(prefix="npuserve-tokenizer-") as tmp:
        for name, text in files.items():
            if "/" in name or name.startswith("."):
                raise UnavailableError(f"model info holds an unsafe file name {name!r}")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return load_tokenizer(tmp)
