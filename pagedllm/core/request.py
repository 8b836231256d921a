"""The scheduler's view of one request: its tokens, how many are computed, and its status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pagedllm.lora.request import LoRARequest
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()  # its own data broke a step: it alone was ended

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never None here
    arrival_time: float = field(default_factory=time.monotonic)
    cache_salt: str | None = None  # requests with different salts never share cached blocks
    priority: int = 0  # under the priority policy, lower values are served first (vLLM's order)
    lora_request: LoRARequest | None = None  # the adapter it runs under; None: the base model
    # a pooling request: one forward pass over the whole prompt in one step, then it ends with
    # its pooled result (None: a generation request)
    pooling_params: PoolingParams | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    # Parallel sampling (best_of > 1): the ids of the sequences to fork off this one once its
    # prompt is computed; they then share its blocks. Emptied by the fork.
    pending_fork_ids: list[str] = field(default_factory=list)
    # Structured outputs: True while the request's grammar compiles off the step loop; the
    # scheduler lets such a request wait without holding up the ones behind it.
    waiting_for_grammar: bool = False
    # Speculative decoding: draft tokens proposed after the last step, verified in the next
    # one (scheduled after the request's last token); never part of all_token_ids.
    spec_token_ids: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def lora_int_id(self) -> int:
        """The adapter's id, 0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def fork(self, request_id: str) -> Request:
        """A sibling at the same point: same tokens, same progress, its own future."""
        child = Request(request_id, self.prompt_token_ids, self.sampling_params, self.max_tokens,
                        self.arrival_time, self.cache_salt, self.priority, self.lora_request,
                        status=self.status,
                        output_token_ids=list(self.output_token_ids),
                        num_computed_tokens=self.num_computed_tokens,
                        num_cached_tokens=self.num_cached_tokens)
        child.all_token_ids = list(self.all_token_ids)
        return child

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_token_stop(self, max_model_len: int) -> RequestStatus | None:
        """After a token was appended: has the request reached a token-level stop?"""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last == params.eos_token_id:
                return RequestStatus.FINISHED_STOPPED
            if last in params.all_stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
