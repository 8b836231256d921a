"""A picture of the paged KV cache and the queues at one moment, for the live dashboard.

Taken between two steps, only when someone asks (the dashboard's stream, a few times a second
while a page is open), so the step loop pays nothing while nobody watches. Plain data only:
it is pickled across the engine-core process boundary like the step's CoreStats.

Each device block gets one state byte:

    FREE    ref_cnt 0, no hash: empty
    CACHED  ref_cnt 0, holds a prefix hash: free, but a later request with the same prefix
            takes it back without computing it (evicted only when handed out again)
    USED    one owner
    HIT     one owner, which took it over from the prefix cache (no compute)
    SHARED  several owners: prefix hits of requests running together, n > 1, beam forks

Who owns a block is not stored per block: each request carries its block table, so the owner
map is the inverse of the tables and costs nothing for free blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pagedllm.core.block_pool import KVCacheBlock
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.stats import KVCacheStats

FREE, CACHED, USED, HIT, SHARED = range(5)
STATE_NAMES = ("free", "cached", "used", "hit", "shared")  # indexed by the state byte
HASH_PREFIX_BYTES = 4  # of each block's sha256: enough to tell blocks apart on a page
NO_HASH = bytes(HASH_PREFIX_BYTES)


@dataclass(slots=True)
class RequestView:
    """One unfinished request (a sequence: a fork of n > 1 or a beam is one of its own)."""

    request_id: str
    state: str  # "running", "waiting", "preempted" (to recompute) or "swapped" (host memory)
    num_prompt_tokens: int
    num_computed_tokens: int  # prompt and output tokens whose KV is in the cache
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens it found in the prefix cache when admitted
    age_s: float  # since it arrived
    block_ids: list[int]  # its block table on the device (empty while swapped out or waiting)


@dataclass(slots=True)
class EngineSnapshot:
    taken_at: float  # time.monotonic() in the process that took it
    num_steps: int  # steps the core had run (the snapshot follows that step's update)
    block_states: bytes  # one state byte per device block (FREE ... SHARED)
    block_hashes: bytes  # HASH_PREFIX_BYTES per block; zeros for a block without a hash
    requests: list[RequestView]  # running (in batch order), then waiting (in queue order)
    num_running: int
    num_waiting: int
    kv_cache: KVCacheStats
    # since start-up, for rates: prompt tokens computed (prefix hits excluded), tokens sampled
    num_prompt_tokens: int
    num_output_tokens: int
    cost_s: float = 0.0  # how long taking it held the step loop up


def take_snapshot(scheduler: Scheduler, num_steps: int, num_prompt_tokens: int,
                  num_output_tokens: int) -> EngineSnapshot:
    """The scheduler's blocks and requests now; O(blocks + requests' table entries)."""
    started = time.perf_counter()
    kv, blocks = scheduler.kv, scheduler.kv.pool.blocks
    requests = [*scheduler.running, *scheduler.waiting]
    tables = {r.request_id: kv.block_ids(r.request_id) for r in requests}
    now = time.monotonic()
    snapshot = EngineSnapshot(
        taken_at=now, num_steps=num_steps,
        block_states=block_states(blocks, hit_blocks(requests, tables, kv.block_size)),
        block_hashes=hash_prefixes(blocks),
        requests=[_view(r, tables[r.request_id], kv.is_swapped(r.request_id), now)
                  for r in requests],
        num_running=scheduler.num_running, num_waiting=scheduler.num_waiting,
        kv_cache=scheduler.kv_cache_stats(), num_prompt_tokens=num_prompt_tokens,
        num_output_tokens=num_output_tokens)
    snapshot.cost_s = time.perf_counter() - started
    return snapshot


# These two run over every block between two steps: comprehensions, no call per block.
def block_states(blocks: list[KVCacheBlock], hits: set[int]) -> bytes:
    """One state byte per block (by block id: the pool's list is in id order); `hits`: blocks
    their one owner took from the prefix cache."""
    return bytes([(FREE if b.block_hash is None else CACHED) if b.ref_cnt == 0
                  else SHARED if b.ref_cnt > 1
                  else HIT if b.block_id in hits else USED for b in blocks])


def hash_prefixes(blocks: list[KVCacheBlock]) -> bytes:
    """HASH_PREFIX_BYTES of each block's hash, zeros for a block without one."""
    return b"".join([NO_HASH if b.block_hash is None else b.block_hash[:HASH_PREFIX_BYTES]
                     for b in blocks])


def hit_blocks(requests: list[Request], tables: dict[str, list[int]], block_size: int) -> set[int]:
    """The blocks that requests took over from the prefix cache: the first
    num_cached_tokens // block_size of each table."""
    hits: set[int] = set()
    for request in requests:
        hits.update(tables[request.request_id][:request.num_cached_tokens // block_size])
    return hits


def _view(request: Request, block_ids: list[int], swapped: bool, now: float) -> RequestView:
    return RequestView(
        request_id=request.request_id, state=_queue_state(request, swapped),
        num_prompt_tokens=request.num_prompt_tokens,
        num_computed_tokens=request.num_computed_tokens,
        num_output_tokens=request.num_output_tokens,
        num_cached_tokens=request.num_cached_tokens,
        age_s=max(0.0, now - request.arrival_time), block_ids=block_ids)


def _queue_state(request: Request, swapped: bool) -> str:
    if swapped:
        return "swapped"
    if request.status == RequestStatus.RUNNING:
        return "running"
    return "preempted" if request.status == RequestStatus.PREEMPTED else "waiting"
