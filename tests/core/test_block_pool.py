import pytest

from pagedllm.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock


def test_allocate_takes_from_the_front_and_counts_owners():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.75)


def test_exhaustion_raises_and_changes_nothing():
    pool = BlockPool(2)
    pool.allocate(2)
    with pytest.raises(ValueError, match="only 0 are free"):
        pool.allocate(1)
    assert pool.num_free_blocks == 0


def test_free_returns_blocks_to_the_back_in_order():
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    pool.free([c, a])
    assert [blk.block_id for blk in pool.free_queue] == [2, 0]
    assert [blk.block_id for blk in pool.allocate(2)] == [2, 0]


def test_shared_block_is_freed_only_by_its_last_owner():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.share([block])
    assert block.ref_cnt == 2
    pool.free([block])
    assert pool.num_free_blocks == 2
    pool.free([block])
    assert pool.num_free_blocks == 3


def test_double_free_is_caught():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(AssertionError, match="double free"):
        pool.free([block])


def test_share_claims_a_free_block_back_from_the_middle_of_the_queue():
    pool = BlockPool(3)
    middle = pool.blocks[1]
    pool.share([middle])
    assert middle.ref_cnt == 1
    assert [b.block_id for b in pool.free_queue] == [0, 2]
    assert pool.num_free_blocks == 2


def test_free_queue_remove_and_empty_pop():
    blocks = [KVCacheBlock(i) for i in range(3)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.remove(blocks[0])
    assert queue.popleft() is blocks[1]
    with pytest.raises(ValueError):
        queue.popleft()
    assert queue.num_free == 0


def test_empty_pool_is_rejected():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)
