"""The logprobs of one sampled position, as the sampler makes them and the engine passes them on.
Low in the tree (no imports from pagedllm) so that the model's sampler and the scheduling core
can share it without either knowing the other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenLogprobs:
    """Logprob of the sampled token and of the top-k alternatives, for one position."""

    token_ids: list[int]  # sampled first, then top-k by rank
    logprobs: list[float]
    sampled_rank: int
