"""Tensor parallelism: one model over N ranks (devices), one process each.

Rank 0 lives in the worker process: the engine, the scheduler and Redis stay there, and its
`TensorParallelRunner` is the torch backend's runner. Ranks 1..N-1 are processes it starts
(`python -m worker.backends.tensor_parallel`), each holding a `ModelRunner` over its shard of
the weights (`worker.model.sharding`) and its share of the KV cache. Each step rank 0
broadcasts the step's chunks as one int64 tensor (no pickles on the hot path), every rank
prepares the same inputs and runs its shard, two all-reduces per layer join them (and one
after the embedding lookup, split by vocabulary rows), and each rank's rows of the logits are
gathered on rank 0 for the engine to sample.

torch.distributed carries it: gloo on CPU, nccl on CUDA, hccl on Ascend. A rank that dies or
hangs ends the group: rank 0 checks its followers before every step and its collectives time
out after `tp_timeout_s`, raising in the worker, which hands its requests back; a follower
whose rank 0 is gone exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from common.errors import ModelConfigError
from common.sampling_params import SamplingParams
from worker.backends.base import SequenceChunk
from worker.backends.cpu_threads import cpu_budget
from worker.backends.torch_runner import ModelRunner, StepInputs
from worker.backends.torch_settings import TorchSettings, device_indices
from worker.model.sharding import Shard
from worker.processes import free_port

log = logging.getLogger(__name__)

STOP = -1
"""A chunk count that tells followers to leave."""
LOGITS = -2
"""A chunk count that tells followers to compute their vocabulary rows' logits of the hidden
states broadcast next, for rank 0 to gather."""
START_TIMEOUT = timedelta(minutes=10)
"""How long the ranks may take to load their shards and join."""
FOLLOWER_IDLE_TIMEOUT = timedelta(days=365)
"""Followers wait for rank 0 however long the queue is idle; they leave when it dies."""


def encode(chunks: Sequence[SequenceChunk]) -> list[int]:
    """[n, then per chunk: start_pos, sample, #tokens, #blocks, tokens..., blocks...]."""
    out = [len(chunks)]
    for c in chunks:
        out += [c.start_pos, int(c.sample), len(c.token_ids), len(c.block_table),
                *c.token_ids, *c.block_table]
    return out


def decode(flat: Sequence[int]) -> list[SequenceChunk]:
    chunks, i = [], 1
    for n in range(flat[0]):
        start, sample, tokens, blocks = flat[i:i + 4]
        i += 4
        ids, table = list(flat[i:i + tokens]), list(flat[i + tokens:i + tokens + blocks])
        i += tokens + blocks
        chunks.append(SequenceChunk(str(n), ids, start, table, bool(sample), SamplingParams()))
    return chunks


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: cpu for every rank; the r-th of a list or range (npu:0-7, cuda:0,2);
    else the r-th device counted from the one given (cuda:2 with 4 ranks: cuda:2..cuda:5)."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return "cpu"
    listed = device_indices(index)
    if listed is not None:
        return f"{kind}:{listed[rank]}"
    return f"{kind}:{int(index or 0) + rank}"


def _backend(device: str) -> str:
    kind = device.partition(":")[0]
    return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}.get(kind, "gloo")


class Group:
    """This process's membership of the group, and the step channel from rank 0.

    Joining waits up to START_TIMEOUT for every rank (they load their shards first); the
    steps then run on a group of their own whose collectives time out after `timeout`."""

    def __init__(self, rank: int, world: int, port: int, device: str,
                 timeout: timedelta) -> None:
        if dist.is_initialized():
            raise ModelConfigError("this process already runs a tensor-parallel group; one "
                                   "model split over ranks per worker process")
        backend = _backend(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=max(timeout, START_TIMEOUT))
        self.steps = dist.new_group(list(range(world)), timeout=timeout, backend=backend)
        self.rank, self.world = rank, world
        self.comm_device = torch.device(device if backend != "gloo" else "cpu")

    def all_reduce(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, group=self.steps)

    def send(self, flat: list[int]) -> None:
        size = torch.tensor([len(flat)], device=self.comm_device)
        dist.broadcast(size, 0, group=self.steps)
        dist.broadcast(torch.tensor(flat, dtype=torch.int64, device=self.comm_device), 0,
                       group=self.steps)

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """Broadcast rank 0's `t` (the others pass a tensor of its shape and dtype to fill)."""
        t = t.to(self.comm_device).contiguous()
        dist.broadcast(t, 0, group=self.steps)
        return t

    def gather(self, local: torch.Tensor, width: int) -> torch.Tensor | None:
        """Every rank's [n, <= width] columns, padded to width, stacked on rank 0 as
        [n, world * width] (None on the others)."""
        padded = torch.zeros(local.shape[0], width, dtype=local.dtype, device=self.comm_device)
        padded[:, :local.shape[1]] = local.to(self.comm_device)
        parts = ([torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0
                 else None)
        dist.gather(padded, parts, dst=0, group=self.steps)
        return torch.cat(parts, dim=1) if parts is not None else None

    def receive(self) -> list[int]:
        size = torch.zeros(1, dtype=torch.int64, device=self.comm_device)
        dist.broadcast(size, 0, group=self.steps)
        flat = torch.empty(int(size.item()), dtype=torch.int64, device=self.comm_device)
        dist.broadcast(flat, 0, group=self.steps)
        return [int(x) for x in flat.tolist()]

    def close(self) -> None:
        dist.destroy_process_group()


class TensorParallelRunner(ModelRunner):
    """Rank 0: a ModelRunner over shard 0 that drives the followers' shards step by step."""

    def __init__(self, model_dir: str | Path, settings: TorchSettings, *,
                 max_model_len: int | None = None, max_num_seqs: int = 1) -> None:
        world = settings.tensor_parallel
        threads = settings.threads or max(1, cpu_budget() // world)
        settings = dataclasses.replace(settings, device=rank_device(settings.device, 0),
                                       threads=threads)
        super().__init__(model_dir, settings, max_model_len=max_model_len,
                         max_num_seqs=max_num_seqs, shard=Shard(0, world))
        port = free_port()
        spec = {"model_dir": str(model_dir), "settings": dataclasses.asdict(settings),
                "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
                "num_blocks": self.num_blocks, "port": port}
        self.followers = [subprocess.Popen(
            [sys.executable, "-m", "worker.backends.tensor_parallel", json.dumps(spec),
             str(rank), str(os.getpid())]) for rank in range(1, world)]
        try:
            self.group = Group(0, world, port, settings.device,
                               timedelta(seconds=settings.tp_timeout_s))
        except Exception:
            self._stop_followers()
            raise
        self.all_reduce = self.group.all_reduce
        log.info("tensor parallel over %d ranks (%s): rank 0 here, followers %s", world,
                 _backend(settings.device), [p.pid for p in self.followers])

    def prepare(self, chunks: Sequence[SequenceChunk]) -> StepInputs:
        """Every forward pass starts here (a step, or a teacher-forced prefill): the
        followers get the chunks and run their shards of the same pass."""
        for rank, proc in enumerate(self.followers, start=1):
            if proc.poll() is not None:
                raise ModelConfigError(
                    f"tensor-parallel rank {rank} exited with status {proc.returncode}; the "
                    "group cannot step without it (see its log above)")
        self.group.send(encode(chunks))
        return super().prepare(chunks)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each rank computes its vocabulary rows' logits; rank 0 gathers the whole row."""
        self.group.send([LOGITS, hidden.shape[0]])
        self.group.share(hidden)
        return vocab_logits(self, self.group, hidden)

    def close(self) -> None:
        """Tell the followers to leave, wait for them, and leave the group."""
        try:
            self.group.send([STOP])
        finally:
            self._stop_followers()
            self.group.close()

    def _stop_followers(self) -> None:
        for proc in self.followers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def vocab_logits(runner: ModelRunner, group: Group, hidden: torch.Tensor) -> torch.Tensor:
    """This rank's logits [n, its vocabulary rows] gathered into [n, vocab] on rank 0 (an
    empty tensor on the others)."""
    vocab = runner.model_config.vocab_size  # a rank's config keeps the whole vocabulary
    width = -(-vocab // group.world)
    local = ModelRunner.logits(runner, hidden)
    full = group.gather(local, width)
    if full is None:
        return local[:0]
    return full[:, :vocab].to(hidden.device)


def _watch_parent(pid: int) -> None:
    """Exit as soon as rank 0's process is gone (its collectives would wait forever)."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.error("rank 0 (pid %d) is gone; leaving", pid)
            os._exit(1)
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    """A follower rank: load its shard, then run every step rank 0 broadcasts."""
    parser = argparse.ArgumentParser(description="a tensor-parallel follower rank")
    parser.add_argument("spec")
    parser.add_argument("rank", type=int)
    parser.add_argument("parent", type=int)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank {args.rank} %(levelname)s %(message)s")
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True).start()
    rank0 = TorchSettings(**spec["settings"])
    settings = dataclasses.replace(rank0, device=rank_device(rank0.device, args.rank))
    world = settings.tensor_parallel
    runner = ModelRunner(spec["model_dir"], settings, max_model_len=spec["max_model_len"],
                         max_num_seqs=spec["max_num_seqs"], shard=Shard(args.rank, world),
                         num_blocks=spec["num_blocks"])
    group = Group(args.rank, world, spec["port"], settings.device, FOLLOWER_IDLE_TIMEOUT)
    runner.all_reduce = group.all_reduce
    hidden_shape = (runner.model_config.hidden_size,)
    with torch.inference_mode():
        while True:
            flat = group.receive()
            if flat[0] == STOP:
                break
            if flat[0] == LOGITS:
                hidden = torch.empty((flat[1], *hidden_shape), dtype=runner.dtype)
                vocab_logits(runner, group, group.share(hidden).to(runner.device))
                continue
            step = runner.prepare(decode(flat))
            runner.forward(step.ids, step.positions, step.meta)
    group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
