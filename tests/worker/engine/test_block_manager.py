"""The block manager alone: block ids, reference counts and the prefix cache's hashes."""

from __future__ import annotations

from common.sampling_params import SamplingParams
from worker.engine.block_manager import BlockManager, hash_block
from worker.engine.request import Request

BS = 4


def request(rid: str, ids: list[int]) -> Request:
    return Request(rid, list(ids), SamplingParams(), frozenset(), 1024)


def admit(m: BlockManager, req: Request) -> list[int]:
    """Allocate the request's whole prompt after its cached prefix; returns the hit blocks."""
    cached = m.cached_prefix(req)
    m.allocate(req, req.num_tokens, cached)
    req.num_computed_tokens = len(cached) * BS
    return cached


def compute(m: BlockManager, req: Request, upto: int | None = None) -> None:
    """As if a step computed the request's tokens up to `upto` (all of them if None)."""
    req.num_computed_tokens = req.num_tokens if upto is None else upto
    m.cache_full_blocks(req)


def test_a_block_hash_covers_its_tokens_and_every_block_before_it() -> None:
    first, other_first = hash_block(None, [1, 2, 3, 4]), hash_block(None, [9, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == first
    assert hash_block(first, [5, 6, 7, 8]) == hash_block(first, [5, 6, 7, 8])
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(other_first, [5, 6, 7, 8])
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [4, 3, 2, 1])


def test_a_second_request_with_the_same_prefix_shares_its_full_blocks() -> None:
    m = BlockManager(16, BS, caching=True)
    a = request("a", list(range(10)))  # two full blocks and two tokens
    assert admit(m, a) == []
    compute(m, a)
    assert m.num_cached_blocks == 2
    b = request("b", list(range(8)) + [50, 51, 52])
    hits = admit(m, b)
    assert hits == a.block_ids[:2]
    assert b.block_ids[2] not in a.block_ids
    assert [m.blocks[i].ref_count for i in hits] == [2, 2]
    assert m.num_free_blocks == 16 - 3 - 1  # a's three, and b's own third block


def test_blocks_are_cached_only_once_all_their_tokens_are_computed() -> None:
    m = BlockManager(16, BS, caching=True)
    a = request("a", list(range(12)))
    admit(m, a)
    compute(m, a, upto=7)  # a chunk of 7: one block full
    assert m.num_cached_blocks == 1
    assert m.cached_prefix(request("b", list(range(12)))) == a.block_ids[:1]
    compute(m, a, upto=12)
    assert m.cached_prefix(request("c", list(range(12)))) == a.block_ids[:2]


def test_a_block_filled_by_decoded_tokens_is_cached_too() -> None:
    m = BlockManager(16, BS, caching=True)
    a = request("a", [1, 2, 3])
    admit(m, a)
    compute(m, a)
    for token in (4, 5):  # the 4th token completes the first block when it is fed
        a.token_ids.append(token)
        m.grow(a, a.num_tokens)
        compute(m, a)
    assert m.cached_prefix(request("b", [1, 2, 3, 4, 5, 6])) == a.block_ids[:1]


def test_the_last_token_is_never_taken_from_the_cache() -> None:
    m = BlockManager(16, BS, caching=True)
    a = request("a", list(range(8)))
    admit(m, a)
    compute(m, a)
    assert m.num_cached_blocks == 2
    same = request("b", list(range(8)))
    assert m.cached_prefix(same) == a.block_ids[:1]  # 7 tokens at most: one full block
    assert m.cached_prefix(request("c", list(range(9)))) == a.block_ids[:2]


def test_requests_whose_prefixes_differ_share_nothing_even_with_equal_later_blocks() -> None:
    m = BlockManager(16, BS, caching=True)
    a = request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(m, a)
    compute(m, a)
    assert m.cached_prefix(request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == []
    assert m.cached_prefix(request("c", [1, 2, 3, 4, 0, 6, 7, 8, 9])) == a.block_ids[:1]


def test_a_freed_cached_block_stays_cached_and_reuse_takes_it_off_the_free_queue() -> None:
    m = BlockManager(8, BS, caching=True)
    a = request("a", list(range(9)))
    admit(m, a)
    compute(m, a)
    first_two = a.block_ids[:2]
    m.free(a)
    assert m.num_free_blocks == 8 and m.num_cached_blocks == 2
    assert all(m.blocks[i].ref_count == 0 for i in first_two)
    b = request("b", list(range(8)) + [70])
    assert admit(m, b) == first_two
    assert [m.blocks[i].ref_count for i in first_two] == [1, 1]
    assert m.num_free_blocks == 8 - 3


def test_blocks_holding_nothing_reusable_are_handed_out_before_cached_ones() -> None:
    m = BlockManager(4, BS, caching=True)
    a = request("a", list(range(6)))  # one full block, one partial
    admit(m, a)
    compute(m, a)
    cached, partial = a.block_ids
    m.free(a)
    b = request("b", list(range(50, 62)))  # three blocks: every free one but the cached
    admit(m, b)
    assert b.block_ids[0] == partial and cached not in b.block_ids
    assert m.num_cached_blocks == 1
    c = request("c", list(range(70, 73)))
    admit(m, c)
    assert c.block_ids == [cached] and m.num_cached_blocks == 0


def test_eviction_takes_the_least_recently_freed_cached_blocks_tail_first() -> None:
    m = BlockManager(6, BS, caching=True)
    old, new = request("old", list(range(100, 109))), request("new", list(range(200, 209)))
    for r in (old, new):
        admit(m, r)
        compute(m, r)
    old_blocks, new_blocks = old.block_ids[:2], new.block_ids[:2]
    m.free(old)
    m.free(new)
    assert m.num_cached_blocks == 4
    c = request("c", list(range(300, 312)))  # three blocks: both partial ones, then one cached
    admit(m, c)
    assert m.num_cached_blocks == 3
    assert old_blocks[1] in c.block_ids  # old's tail went first
    assert m.cached_prefix(request("x", list(range(100, 109)))) == old_blocks[:1]
    assert m.cached_prefix(request("y", list(range(200, 209)))) == new_blocks


def test_an_evicted_block_is_forgotten_and_serves_another_prefix() -> None:
    m = BlockManager(2, BS, caching=True)
    a = request("a", list(range(5)))
    admit(m, a)
    compute(m, a)
    m.free(a)
    b = request("b", list(range(50, 58)))
    assert admit(m, b) == [] and m.num_free_blocks == 0
    assert m.cached_prefix(request("a2", list(range(5)))) == []
    compute(m, b)
    m.free(b)
    assert len(m.cached_prefix(request("b2", list(range(50, 59))))) == 2


def test_the_same_prefix_computed_twice_at_once_is_cached_once() -> None:
    m = BlockManager(8, BS, caching=True)
    a, b = request("a", list(range(6))), request("b", list(range(6)))
    admit(m, a)
    admit(m, b)  # admitted in the same step: nothing cached yet
    compute(m, a)
    compute(m, b)
    first = a.block_ids[0]
    assert m.num_cached_blocks == 1 and m.blocks[first].hash is not None
    assert m.blocks[b.block_ids[0]].hash is None
    m.free(b)
    m.free(a)
    assert m.cached_prefix(request("c", list(range(6)))) == [first]


def test_can_allocate_counts_cached_blocks_taken_back_from_the_free_queue() -> None:
    m = BlockManager(3, BS, caching=True)
    a = request("a", list(range(9)))
    admit(m, a)
    compute(m, a)
    m.free(a)
    b = request("b", list(range(8)) + [1, 2, 3, 4, 5])  # 13 tokens: 4 blocks, 2 of them cached
    hits = m.cached_prefix(b)
    assert len(hits) == 2
    assert not m.can_allocate(b.num_tokens, hits)  # 2 new blocks, 1 free besides the hits
    assert m.can_allocate(12, hits)


def test_without_caching_nothing_is_registered_or_found() -> None:
    m = BlockManager(8, BS)
    a = request("a", list(range(9)))
    admit(m, a)
    compute(m, a)
    assert m.num_cached_blocks == 0 and m.cached_prefix(request("b", list(range(9)))) == []
    m.free(a)
    assert m.num_free_blocks == 8
