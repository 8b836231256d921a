"""A snapshot of the KV cache for /metrics and benchmarks: plain numbers, no references."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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


@dataclass(slots=True)
class SpecDecodingStats:
    """Speculative decoding since start-up: vLLM's spec_decode_* counters. A draft is one
    sequence's proposal verified in one step; position i counts its (i+1)-th draft tokens."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_drafts_per_position: list[int] = field(default_factory=list)
    num_accepted_per_position: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        count_by_position(self.num_drafts_per_position, self.num_accepted_per_position,
                          num_draft_tokens, num_accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / draft tokens (0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def acceptance_per_position(self) -> list[float]:
        return [a / d for a, d in zip(self.num_accepted_per_position,
                                      self.num_drafts_per_position)]

    def copy(self) -> SpecDecodingStats:
        return SpecDecodingStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                                 list(self.num_drafts_per_position),
                                 list(self.num_accepted_per_position))


def count_by_position(drafted: list[int], accepted: list[int], num_drafts: int,
                      num_accepted: int) -> None:
    """Add one verified proposal to per-position counts (index i: proposals with an (i+1)-th
    draft token, and of those, the ones whose (i+1)-th token was accepted)."""
    for counts in (drafted, accepted):
        counts.extend([0] * (num_drafts - len(counts)))
    for position in range(num_drafts):
        drafted[position] += 1
        accepted[position] += position < num_accepted
