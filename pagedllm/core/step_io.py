"""Records that cross the scheduler -> runner -> engine boundary: plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.sampling_params import SamplingParams

BlockCopy = tuple[int, int]  # (source block id, destination block id)


@dataclass(slots=True)
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_position: int  # position of token_ids[0] == tokens already in the cache
    block_ids: list[int]  # the request's whole block table
    sampling_params: SamplingParams
    output_token_ids: list[int]  # generated so far (min_tokens, penalties)
    prompt_token_ids: list[int]  # (repetition penalty, prompt logprobs)
    sample: bool  # does this chunk reach the end of the request's tokens?
    # who gets a token from this row's logits: the request, then any sequences forked from it now
    sample_ids: list[str] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        """Does the row compute exactly one token? The runner batches every such row as a
        decode (one query against the paged cache), a one-token prompt or prompt chunk too, so
        the step's token counts must say the same: this is the one definition, for both."""
        return len(self.token_ids) == 1


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_scheduled_tokens: int
    finished_request_ids: set[str] = field(default_factory=set)  # the runner drops their state
    preempted_request_ids: list[str] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    # Swapping (preemption_mode="swap"): (device block, host block) and (host block, device
    # block). The runner copies out, then in, then block_copies, all before the forward pass.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled if not s.is_decode)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for s in self.scheduled if s.is_decode)


@dataclass(slots=True)
class TokenLogprobs:
    """Logprob of the sampled token and of the top-k alternatives, for one position."""

    token_ids: list[int]  # sampled first, then top-k by rank
    logprobs: list[float]
    sampled_rank: int


@dataclass(slots=True)
class ModelRunnerOutput:
    request_ids: list[str]  # the requests that sampled this step, in order
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None
    # request id -> (position of the first entry, logprobs of each following prompt token)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs | None]]] | None = None


@dataclass(slots=True)
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs | None]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
