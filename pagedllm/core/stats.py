"""A snapshot of the KV cache for /metrics and benchmarks: plain numbers, no references."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True, frozen=True)
class KVCacheStats:
    """The cache now, plus counters since start-up.

    Waste is internal fragmentation: slots of in-use blocks that hold no token, which can only
    be the unfilled end of each request's last block (blocks are added only when the tokens of
    a step spill past the last one). Cached blocks nobody uses count as free.
    """

    num_blocks: int
    num_free_blocks: int  # including cached blocks no request uses (evictable)
    block_size: int
    num_allocated_slots: int  # slots of blocks in use
    num_empty_slots: int  # of those, slots that hold no token
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_evictions: int  # cached blocks whose hash was dropped to reuse them
    num_preemptions: int
    num_swap_outs: int  # preemptions that copied the request to host memory
    num_swap_ins: int
    num_swapped_requests: int  # in host memory now
    num_host_blocks: int  # swap space, in blocks (0 when preemption recomputes)
    num_free_host_blocks: int

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0 to 1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def waste_fraction(self) -> float:
        """Empty slots as a fraction of allocated slots (0 when nothing is allocated)."""
        return self.num_empty_slots / self.num_allocated_slots if self.num_allocated_slots else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        queries = self.prefix_cache_queries
        return self.prefix_cache_hits / queries if queries else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "usage": self.usage, "waste_fraction": self.waste_fraction,
                "prefix_cache_hit_rate": self.prefix_cache_hit_rate}
