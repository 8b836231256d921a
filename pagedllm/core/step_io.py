"""Records that cross the scheduler -> runner -> engine boundary: plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.logprobs import TokenLogprobs
from pagedllm.lora.request import LoRARequest
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams

BlockCopy = tuple[int, int]  # (source block id, destination block id)


@dataclass(slots=True)
class ScheduledRequest:
    """One request's row of a step. Every list is the row's own copy (see SchedulerOutput)."""

    request_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_position: int  # position of token_ids[0] == tokens already in the cache
    block_ids: list[int]  # the request's whole block table, as of this step
    sampling_params: SamplingParams  # shared, not copied: nobody changes it once added
    output_token_ids: list[int]  # generated so far (min_tokens, penalties)
    prompt_token_ids: list[int]  # (repetition penalty, prompt logprobs)
    sample: bool  # does this chunk reach the end of the request's tokens?
    # who gets a token from this row's logits: the request, then any sequences forked from it now
    sample_ids: list[str] = field(default_factory=list)
    lora_request: LoRARequest | None = None  # the row's adapter (immutable); None: base model
    # Speculative decoding: the drafts at the end of token_ids, to verify. The row then samples
    # from each of its last len(spec_token_ids) + 1 positions (a decode row never has drafts).
    spec_token_ids: list[int] = field(default_factory=list)
    pooling_params: PoolingParams | None = None  # a pooling row: the whole prompt, pooled

    @property
    def is_decode(self) -> bool:
        """Does the row compute exactly one token? The runner batches every such row as a
        decode (one query against the paged cache), a one-token prompt or prompt chunk too, so
        the step's token counts must say the same: this is the one definition, for both."""
        return len(self.token_ids) == 1


@dataclass(slots=True)
class SchedulerOutput:
    """What the scheduler decided for one step, for the runner to execute.

    Contract: these are values the core will not mutate afterwards. Every list and set here and
    in each ScheduledRequest is made for this output, never the scheduler's, the KV-cache
    manager's or a Request's own list: appended tokens, later steps and aborts leave an output
    already returned as it was, so a consumer may keep it while the core moves on. Only
    `sampling_params` is shared, and nobody changes it once the request is added.
    """

    scheduled: list[ScheduledRequest]  # the rows of the step: running requests, then admitted
    num_scheduled_tokens: int  # sum of len(token_ids) over `scheduled`; within the budget
    # finished (stopped or aborted) since the last step: the runner drops their state
    finished_request_ids: set[str] = field(default_factory=set)
    # preempted this step, in that order: freed to be recomputed, or swapped out (below)
    preempted_request_ids: list[str] = field(default_factory=list)
    # Block copies the step's allocations caused, each (src, dst) by block id. The runner makes
    # them all before the forward pass, in this order: swap out, swap in, then copy-on-write (a
    # device block freed by a swap-out may be the target of a swap-in or of a copy).
    block_copies: list[BlockCopy] = field(default_factory=list)  # copy-on-write, device -> device
    blocks_to_swap_out: list[BlockCopy] = field(default_factory=list)  # (device, host) blocks
    blocks_to_swap_in: list[BlockCopy] = field(default_factory=list)  # (host, device) blocks
    # Not the core's: the engine's structured-output step sets it after schedule() to the
    # bitmask the runner applies to the logits (structured_output.bitmask.GrammarBitmask), or
    # leaves None. Typed loosely because core/ may not import what is above it.
    grammar: Any = None
    # request id -> why scheduling it failed (its own data, e.g. its prefix hash): ended with
    # finish_reason "error" while the step went on for everyone else
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled if not s.is_decode)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for s in self.scheduled if s.is_decode)


@dataclass(slots=True)
class ModelRunnerOutput:
    request_ids: list[str]  # the requests that sampled this step, in order
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None
    # request id -> (position of the first entry, logprobs of each following prompt token)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs | None]]] | None = None
    # sequence id -> why its row could not be sampled (its own parameters broke the set-up);
    # its token above is a placeholder, and the scheduler ends it with finish_reason "error"
    failed: dict[str, str] = field(default_factory=dict)
    # Speculative decoding. request id -> the drafts its row accepted, which come before its
    # sampled token above (absent: it verified none), and their logprobs (None entries where
    # none were asked for); then sequence id -> drafts proposed for its next step.
    accepted_token_ids: dict[str, list[int]] = field(default_factory=dict)
    accepted_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # pooling requests: request id -> its pooled result as plain lists (a vector, a matrix for
    # ALL pooling, or the class probabilities / score), for every row that ended its prompt
    pooled: dict[str, list] = field(default_factory=dict)


@dataclass(slots=True)
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs | None]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    pooled: list | None = None  # a pooling request's result (it ends with it)
