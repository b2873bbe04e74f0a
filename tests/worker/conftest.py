"""A stand-in gateway for worker tests: enqueues and cancels exactly as a gateway does (the
shared Lua scripts, QueuedRequest.to_fields, keys.queue_score) and reads its reply stream;
and in-process worker services over one shared engine of the tiny random Qwen3."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common import scripts
from common.config import EngineConfig, RedisConfig, WorkerConfig
from common.keys import Keys, queue_score
from common.protocol import QueuedRequest, ReplyEvent, decode_events
from common.sampling_params import SamplingParams
from worker.backends.torch_settings import TorchSettings
from worker.engine.engine import Engine
from worker.redis_queue import RedisQueue
from worker.service import WorkerService

MODEL = "tiny"


class FakeGateway:
    def __init__(self, url: str, gateway_id: str = "gw1", prefix: str = "npuserve:") -> None:
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.keys = Keys(prefix)
        self.gateway_id = gateway_id
        self._enqueue = self.client.register_script(scripts.ENQUEUE)
        self._cancel = self.client.register_script(scripts.CANCEL)
        self.register()

    def register(self) -> None:
        """A live gateway's registration (no TTL here: tests delete it to kill the gateway)."""
        self.client.hset(self.keys.gateway(self.gateway_id), "pid", "0")

    def enqueue(self, request_id: str, prompt: list[int], params: SamplingParams, *,
                priority: int = 0, deadline_ms: int = 0, enqueue_ms: int | None = None,
                published: list[int] | None = None, model: str = MODEL) -> None:
        """Queue a request; `published` pre-fills toks:{id} as an earlier worker would."""
        enqueue_ms = enqueue_ms if enqueue_ms is not None else time.time_ns() // 1_000_000
        req = QueuedRequest(request_id, model, self.gateway_id, prompt, params, priority,
                            enqueue_ms, deadline_ms)
        score = queue_score(priority, enqueue_ms)
        flat = [x for kv in req.to_fields(score).items() for x in kv]
        if published:
            self.client.rpush(self.keys.tokens(model, request_id), *published)
        k = self.keys
        self.client.set(k.request_model(request_id), model)
        result = self._enqueue(keys=[k.queue(model), k.request(model, request_id),
                                     k.wake(model), k.tokens(model, request_id)],
                               args=[request_id, score, 0, 3600, *flat])
        assert result == 1

    def cancel(self, request_id: str, model: str = MODEL) -> int:
        k = self.keys
        return int(self._cancel(keys=[k.queue(model), *k.request_keys(model, request_id)],
                                args=[request_id, 60]))

    def entries(self) -> list[list[ReplyEvent]]:
        """Every stream entry of this gateway's replies, each a list of events."""
        raw = self.client.xrange(self.keys.replies(self.gateway_id))
        return [decode_events(fields["e"]) for _, fields in raw]

    def events(self, request_id: str) -> list[ReplyEvent]:
        return [e for entry in self.entries() for e in entry if e.request_id == request_id]

    def finished(self, request_id: str) -> bool:
        return any(e.finish_reason for e in self.events(request_id))

    def retained(self, request_id: str, model: str = MODEL) -> bool:
        """Finished, and kept (request with its final event, tokens) for resumption only:
        no lease, no cancel flag, expiring within the retention."""
        k, c = self.keys, self.client
        return (c.hexists(k.request(model, request_id), "final")
                and 0 < c.ttl(k.request(model, request_id)) <= 60
                and not c.exists(k.cancel(model, request_id))
                and not any(request_id in c.zrange(key, 0, -1) for key in c.keys(
                    k.leases("*"))))


@pytest.fixture
def gateway(redis_url: str) -> Iterator[FakeGateway]:
    gw = FakeGateway(redis_url)
    yield gw
    gw.client.close()


MakeService = Callable[..., WorkerService]


@pytest.fixture(scope="module")
def engine(tiny_qwen3: Path) -> Engine:
    return Engine.from_model_dir(tiny_qwen3, EngineConfig(max_num_seqs=4),
                                 settings=TorchSettings(kv_cache_gb=0.05))


@pytest.fixture
def make_service(engine: Engine, tiny_qwen3: Path, redis_url: str
                 ) -> Iterator[MakeService]:
    """`(capacity=4, worker_id="w1", drain_s=0.0, **WorkerConfig fields)` -> a started
    WorkerService of model MODEL over the shared engine; closed after the test."""
    made: list[WorkerService] = []

    def make(capacity: int = 4, worker_id: str = "w1", drain_s: float = 0.0,
             **config: Any) -> WorkerService:
        cfg = WorkerConfig(model_dir=str(tiny_qwen3), model_name=MODEL,
                           engine=EngineConfig(max_num_seqs=capacity),
                           redis=RedisConfig(url=redis_url), worker_id=worker_id,
                           drain_timeout_s=drain_s, **config)
        queue = RedisQueue.connect(cfg.redis, MODEL, worker_id, cfg.lease_ms,
                                   cfg.stream_retention_s)
        service = WorkerService(cfg, engine, queue)
        service.start()
        made.append(service)
        return service

    yield make
    for service in made:
        for rid in service.active_ids:
            engine.abort(rid)
        service.close()
    assert not engine.has_unfinished()


def small_vocab_checkpoint(path: Path, arch: str) -> Path:
    """A tiny random float32 Qwen2 (2 layers) or Qwen3 (3 layers, head_dim 32) with a
    1,024-token byte-level BPE tokenizer trained here: the BM1684X simulator is slow over a
    real vocabulary."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

    torch.manual_seed(0)
    common = dict(vocab_size=1024, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, rope_theta=1e6)
    config = (Qwen3Config(num_hidden_layers=3, head_dim=32, **common) if arch == "qwen3"
              else Qwen2Config(num_hidden_layers=2, **common))
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = (Path(__file__).parents[2] / "worker" / "quant" / "eval_prompts.jsonl").read_text()
    bpe.train_from_iterator([text] * 4, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


def compiled_tiny(arch: str, *, seqlen: int, quant: str, sample_on_host: bool = True,
                  decode_batch: int = 1) -> tuple[Path, Path, dict[str, Any]]:
    """(checkpoint, bmodel dir, manifest) of a small-vocabulary tiny model compiled for the
    BM1684X, cached under NPUSERVE_TEST_CACHE (default ~/.cache/npuserve/test-bmodels) by the
    checkpoint recipe and the options; compile_bmodel itself recompiles only when the
    checkpoint, the options or the tpu-mlir version changed."""
    import hashlib
    import inspect
    import os

    from worker.checkpoints.bmodel import compile_bmodel
    from worker.checkpoints.tpu_toolchain import require_toolchain

    recipe = hashlib.sha256(inspect.getsource(small_vocab_checkpoint).encode()).hexdigest()
    root = Path(os.environ.get("NPUSERVE_TEST_CACHE",
                               Path.home() / ".cache" / "npuserve" / "test-bmodels"))
    home = root / (f"{arch}-{recipe[:10]}")
    head = "host" if sample_on_host else "chip"
    if not (home / "source" / "config.json").is_file():
        small_vocab_checkpoint(home / "source", arch)
    out = home / f"{quant}-seq{seqlen}-{head}-b{decode_batch}"
    manifest = compile_bmodel(home / "source", out, seqlen=seqlen, quant=quant,
                              sample_on_host=sample_on_host, toolchain=require_toolchain(),
                              decode_batch=decode_batch)
    return home / "source", out, manifest


def greedy_alone(runtime: Any, manifest: dict[str, Any], prompt: list[int], n: int) -> list[int]:
    """The first n greedy tokens of `prompt` in a bmodel slot of its own: what a request
    must get from the sophon backend, whatever shares its pool."""
    from worker.backends.sophon.protocol import BmodelSession

    alone = BmodelSession(runtime, manifest)
    tokens = [int(alone.prefill(prompt).argmax())]
    while len(tokens) < n:
        tokens.append(int(alone.decode(tokens[-1]).argmax()))
    return tokens
