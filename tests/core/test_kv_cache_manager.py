from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams


def make_request(request_id: str, prompt_len: int) -> Request:
    return Request(request_id, list(range(1, prompt_len + 1)), SamplingParams(), max_tokens=16)


def test_blocks_are_added_only_at_block_boundaries():
    manager = KVCacheManager(BlockPool(10), block_size=4)
    request = make_request("a", 6)
    assert manager.allocate_slots(request, 6) is not None
    assert len(manager.block_ids("a")) == 2  # 6 tokens -> 2 blocks of 4
    request.num_computed_tokens = 6
    assert manager.allocate_slots(request, 1) is not None  # slot 7 fits in block 2
    assert len(manager.block_ids("a")) == 2
    request.num_computed_tokens = 8
    assert manager.allocate_slots(request, 1) is not None  # token 9 needs a third block
    assert len(manager.block_ids("a")) == 3


def test_allocation_fails_without_side_effects_when_short():
    pool = BlockPool(3)
    manager = KVCacheManager(pool, block_size=4)
    assert manager.allocate_slots(make_request("a", 8), 8) is not None
    big = make_request("b", 8)
    assert manager.allocate_slots(big, 8) is None
    assert manager.block_ids("b") == []
    assert pool.num_free_blocks == 1


def test_free_returns_every_block_and_forgets_the_table():
    pool = BlockPool(8)
    manager = KVCacheManager(pool, block_size=4)
    request = make_request("a", 13)
    manager.allocate_slots(request, 13)
    assert (pool.num_blocks - pool.num_free_blocks) * 4 == 16  # 13 tokens fill 4 blocks
    manager.free(request)
    assert pool.num_free_blocks == 8
    assert manager.block_ids("a") == []
    manager.free(request)  # freeing an unknown request is a no-op
    assert pool.num_free_blocks == 8


def test_copy_on_write_copies_are_returned_by_the_allocation():
    pool = BlockPool(10)
    manager = KVCacheManager(pool, block_size=4)
    parent = make_request("a", 6)  # blocks [full, 2 of 4 filled]
    assert manager.allocate_slots(parent, 6) == []  # nothing shared: no copy
    parent.num_computed_tokens = 6
    child = parent.fork("b")
    manager.fork(parent, child)
    shared = manager.block_ids("a")
    assert manager.block_ids("b") == shared

    copies = manager.allocate_slots(parent, 1)  # token 7 lands in the shared partial block
    assert copies == [(shared[1], manager.block_ids("a")[1])]
    assert manager.block_ids("a")[0] == shared[0] and manager.block_ids("a")[1] != shared[1]
    assert manager.num_cow_copies == 1
    assert not hasattr(manager, "pending_copies")  # the return value is the only record of it

    assert manager.allocate_slots(child, 1) == []  # the last owner left writes in place
    assert manager.block_ids("b") == shared and manager.num_cow_copies == 1


def test_block_ids_is_a_copy_the_caller_may_keep():
    manager = KVCacheManager(BlockPool(10), block_size=4)
    request = make_request("a", 4)
    manager.allocate_slots(request, 4)
    kept = manager.block_ids("a")
    kept.append(99)
    request.num_computed_tokens = 4
    manager.allocate_slots(request, 1)  # a second block
    assert len(kept) == 2 and kept[1] == 99
    assert len(manager.block_ids("a")) == 2 and manager.block_ids("a")[1] != 99
