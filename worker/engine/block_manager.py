"""Which KV cache blocks each request owns. Pure bookkeeping over block ids."""

from __future__ import annotations

from collections import deque

from worker.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, request: Request, num_tokens: int) -> bool:
        """Whether the request's blocks can be extended to hold num_tokens tokens."""
        return self.blocks_for(num_tokens) - len(request.block_ids) <= len(self._free)

    def grow(self, request: Request, num_tokens: int) -> None:
        missing = self.blocks_for(num_tokens) - len(request.block_ids)
        if missing > len(self._free):
            raise RuntimeError(f"grow() without can_grow(): {missing} > {len(self._free)} free")
        for _ in range(missing):
            request.block_ids.append(self._free.popleft())

    def free(self, request: Request) -> None:
        self._free.extend(request.block_ids)
        request.block_ids = []
