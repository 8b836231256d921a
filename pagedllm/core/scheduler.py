"""Continuous batching with one token budget per step.

Each step hands out at most `max_num_batched_tokens` tokens. Running requests come first, in
admission order; each gets all the tokens it still has to compute (one for a decode, a chunk for
a prompt) as far as the budget lasts. Then waiting requests are admitted, oldest first, while the
budget, the sequence cap and the free blocks allow. There is no separate prefill or decode phase:
a request just has `num_computed_tokens` out of `num_tokens`.

When a running request needs a block and none is free, the most recently admitted request is
preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed (prompt plus the tokens it had generated) when memory allows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.outputs import (
    EngineCoreOutput,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from pagedllm.core.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_since_last_step: set[str] = set()
        self.num_preemptions = 0

    # ---- intake -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._free(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._make_room(request, num_new, preempted):
                break  # the request itself was preempted: nothing after it is running now
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            index += 1

        # A step that had to preempt is short of memory: admitting more would only thrash.
        while not preempted and self.waiting and budget > 0 and self._has_seat():
            request = self.waiting[0]
            cached = self.kv.get_computed_blocks(request)
            num_hit = len(cached) * self.kv.block_size
            num_new = min(request.num_tokens - request.num_computed_tokens - num_hit, budget)
            if not self.kv.allocate_slots(request, num_new, cached):
                break
            request.num_computed_tokens += num_hit
            request.num_cached_tokens = num_hit
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

        finished, self._finished_since_last_step = self._finished_since_last_step, set()
        return SchedulerOutput(
            scheduled=scheduled,
            num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
            finished_request_ids=finished,
            preempted_request_ids=preempted,
        )

    def _has_seat(self) -> bool:
        return len(self.running) < self.config.max_num_seqs

    def _make_room(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Allocate slots for `request`, preempting the newest running requests if needed."""
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + num_new],
            start_position=start,
            block_ids=self.kv.block_ids(request.request_id),
            sampling_params=request.sampling_params,
            output_token_ids=request.output_token_ids,
            prompt_token_ids=request.prompt_token_ids,
            sample=start + num_new == request.num_tokens,
        )

    # ---- after the model ran ------------------------------------------------------------------
    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        for item in scheduler_output.scheduled:
            request = self.requests.get(item.request_id)
            if request is not None:  # may have been aborted while the model ran
                request.num_computed_tokens += len(item.token_ids)

        outputs = []
        logprobs = runner_output.logprobs or [None] * len(runner_output.request_ids)
        for request_id, token_id, token_logprobs in zip(
            runner_output.request_ids, runner_output.sampled_token_ids, logprobs
        ):
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            request.append_output_token(token_id)
            stop = request.check_token_stop(self.config.max_model_len)
            if stop is not None:
                self.running.remove(request)
                self._free(request, stop)
            outputs.append(EngineCoreOutput(
                request_id, [token_id], [token_logprobs],
                finish_reason=request.finish_reason, stop_reason=request.stop_reason,
                num_cached_tokens=request.num_cached_tokens,
            ))
        return outputs

    def _free(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_since_last_step.add(request.request_id)
