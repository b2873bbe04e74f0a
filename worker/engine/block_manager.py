"""Which KV cache blocks each request owns, and which full blocks are kept for reuse.

Pure bookkeeping over block ids. With prefix caching on, a block whose tokens have all been
computed is registered under a hash of its token ids chained to the hash of the block before
it, so a hash names the whole prefix up to the block's end: two requests share a block only
when every token up to its end is the same. Within one engine nothing else changes a block's
keys and values (one model, positions counted from 0), so ids and the parent's hash suffice.

Blocks are reference-counted. A block no request holds goes to the free queue but keeps its
contents and hash, so a later request with the same prefix takes it back instead of
computing it again. New blocks come from the front of the queue: first those holding nothing
reusable, then cached ones, least recently freed first, whose hash is forgotten then.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from worker.engine.request import Request

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """The hash of a full block: its token ids after the hash of the block before it (None
    for a sequence's first block). 128 bits, so distinct prefixes never meet in practice."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    """Requests holding the block; 0 while it waits in the free queue."""
    hash: BlockHash | None = None
    """Set while the block is registered in the prefix cache."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        """Whether full blocks are registered and found again (prefix caching)."""
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        """Blocks no request holds, next to be handed out first."""
        self._cached: dict[BlockHash, int] = {}
        """Hash -> the block holding that prefix's last block_size tokens."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones among them can be taken for new tokens)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or not."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks of token ids (computed once, kept on it)."""
        hashes, bs, ids = request.block_hashes, self.block_size, request.token_ids
        for i in range(len(hashes), len(ids) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, ids[i * bs:(i + 1) * bs]))
        return hashes

    def cached_prefix(self, request: Request) -> list[int]:
        """The blocks holding the longest cached prefix of the request's tokens, in order.

        Never all of them: the last token is computed, so that there are logits to sample."""
        if not self.caching:
            return []
        hits = []
        for h in self.block_hashes(request)[:(request.num_tokens - 1) // self.block_size]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, num_tokens: int, cached: Sequence[int]) -> bool:
        """Whether a request holding no blocks can take the `cached` ones (from
        cached_prefix) and new ones up to num_tokens tokens."""
        reclaimed = sum(self.blocks[b].ref_count == 0 for b in cached)
        return self.blocks_for(num_tokens) - len(cached) <= len(self._free) - reclaimed

    def allocate(self, request: Request, num_tokens: int, cached: Sequence[int]) -> None:
        """Give a request holding no blocks the `cached` ones, then new ones up to
        num_tokens tokens. The caller marks the cached tokens computed."""
        if request.block_ids:
            raise RuntimeError(f"allocate() for {request.request_id}, which holds blocks")
        if not self.can_allocate(num_tokens, cached):
            raise RuntimeError("allocate() without can_allocate()")
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        request.block_ids = list(cached)
        request.num_registered_blocks = len(cached)
        self.grow(request, num_tokens)

    def can_grow(self, request: Request, num_tokens: int) -> bool:
        """Whether the request's blocks can be extended to hold num_tokens tokens."""
        return self.blocks_for(num_tokens) - len(request.block_ids) <= len(self._free)

    def grow(self, request: Request, num_tokens: int) -> None:
        missing = self.blocks_for(num_tokens) - len(request.block_ids)
        if missing > len(self._free):
            raise RuntimeError(f"grow() without can_grow(): {missing} > {len(self._free)} free")
        for _ in range(missing):
            request.block_ids.append(self._take_free())

    def free(self, request: Request) -> None:
        """Release the request's blocks; cached ones stay cached until their room is needed."""
        for block_id in reversed(request.block_ids):  # a prefix's tail is evicted before its head
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:  # holds nothing reusable: hand it out first
                    self._free.move_to_end(block_id, last=False)
        request.block_ids = []
        request.num_registered_blocks = 0

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks whose tokens have all been computed (call after
        num_computed_tokens advanced: their keys and values are in the cache)."""
        full = request.num_computed_tokens // self.block_size
        if not self.caching or full <= request.num_registered_blocks:
            return
        hashes = self.block_hashes(request)
        for i in range(request.num_registered_blocks, full):
            block = self.blocks[request.block_ids[i]]
            # Another request may have computed the same prefix in the same step: the first
            # registered keeps the hash, this copy is freed as an ordinary block.
            if hashes[i] not in self._cached and block.hash is None:
                self._cached[hashes[i]] = block.block_id
                block.hash = hashes[i]
        request.num_registered_blocks = full

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id
